"""Recursive doubling allreduce: ``log2(P)`` full-buffer exchanges, for small messages.

Partners ``d = 1, 2, 4, ...`` apart swap their whole buffers and both add; since float
addition is commutative, both partners get the same bits, so all ranks end bitwise
identical. A non-power-of-two world folds its extra ranks in first. Cost:
``log2(p2)`` latencies (+2 when folding) but the whole buffer sent at every step: the
choice for latency-bound sizes.
"""

import numpy as np

from granger_mpi.collectives.buffers import (TAG_RD, fold_in, fold_out, folded_rank,
                                             largest_power_of_two, scratch)


def allreduce(comm, buf):
    """Sum ``buf`` over ``comm`` in place."""
    size = comm.Get_size()
    if size == 1:
        return
    p2 = largest_power_of_two(size)
    work = scratch(comm, buf.size, buf.dtype)
    index = fold_in(comm, buf, work, TAG_RD)
    if index >= 0:
        distance = 1
        while distance < p2:
            partner = folded_rank(comm, index ^ distance)
            comm.Sendrecv(buf, partner, TAG_RD, work, partner, TAG_RD)
            np.add(buf, work, out=buf)
            distance *= 2
    fold_out(comm, buf, TAG_RD)
