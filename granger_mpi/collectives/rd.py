"""Recursive doubling allreduce: ``log2(P)`` full-buffer exchanges, for small messages.

Partners ``d = 1, 2, 4, ...`` apart swap their whole buffers and both add; since float
addition is commutative, both partners get the same bits, so all ranks end bitwise
identical. A non-power-of-two world folds its extra ranks in first. Cost:
``log2(p2)`` latencies (+2 when folding) but the whole buffer sent at every step: the
choice for latency-bound sizes, so the per-call Python work is kept to a cached plan.
"""

import numpy as np

from granger_mpi.collectives.buffers import (TAG_RD, cache, exchanged, fold_in, fold_out,
                                             folded_index, folded_rank, largest_power_of_two,
                                             scratch)


def _partners(comm):
    """World ranks this rank swaps with, in order (empty for a rank folded out), cached."""
    store = cache(comm)
    partners = store.get("rd-partners")
    if partners is None:
        size = comm.Get_size()
        p2 = largest_power_of_two(size)
        index = folded_index(comm.Get_rank(), size)
        partners = [] if index < 0 else [folded_rank(comm, index ^ (1 << k))
                                         for k in range(p2.bit_length() - 1)]
        store["rd-partners"] = partners = (p2 == size, partners)
    return partners


def allreduce(comm, buf):
    """Sum ``buf`` over ``comm`` in place."""
    power_of_two, partners = _partners(comm)
    work = scratch(comm, buf.size, buf.dtype)
    if power_of_two:
        for partner in partners:
            comm.Sendrecv(buf, partner, TAG_RD, work, partner, TAG_RD)
            np.add(buf, work, out=buf)
            exchanged()
        return
    if fold_in(comm, buf, work, TAG_RD) >= 0:
        for partner in partners:
            comm.Sendrecv(buf, partner, TAG_RD, work, partner, TAG_RD)
            np.add(buf, work, out=buf)
            exchanged()
    fold_out(comm, buf, TAG_RD)
