"""Ring allreduce: reduce-scatter then allgather around the ring of ranks.

Each of the ``P - 1`` reduce-scatter steps sends one segment to the right neighbour and
adds the left neighbour's segment in (pipelined in pieces); each allgather step passes a
finished segment on. Every element is summed by one rank in ring order and then copied,
so all ranks end bitwise identical, and the order is fixed by rank, never by timing.
Cost: ``2(P-1)`` latencies, ``2(P-1)/P`` of the buffer sent per rank.
"""

from granger_mpi.collectives.buffers import (TAG_RING, scratch, segment_offsets, sendrecv_add,
                                             sendrecv_copy)


def reduce_scatter(comm, buf):
    """Sum over ``comm`` so that rank ``r`` ends holding segment ``r`` of the sum.

    Collective; in place. Segments are ``segment_offsets(len(buf), P)``; the rest of
    ``buf`` is left holding partial sums. Returns ``(lo, hi)`` of this rank's segment.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    off = segment_offsets(buf.size, size)
    if size == 1:
        return off[0], off[1]
    right, left = (rank + 1) % size, (rank - 1) % size
    work = scratch(comm, off[-1] - off[-2] + 1, buf.dtype)
    for step in range(size - 1):
        send = (rank - step - 1) % size
        recv = (rank - step - 2) % size
        sendrecv_add(comm, buf, (off[send], off[send + 1]), right,
                     (off[recv], off[recv + 1]), left, work, TAG_RING)
    return off[rank], off[rank + 1]


def allgather(comm, buf):
    """Rank ``r`` contributes segment ``r`` of ``buf``; afterwards every rank has all of them.

    Collective; in place; the inverse layout of ``reduce_scatter``.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    off = segment_offsets(buf.size, size)
    right, left = (rank + 1) % size, (rank - 1) % size
    for step in range(size - 1):
        send = (rank - step) % size
        recv = (rank - step - 1) % size
        sendrecv_copy(comm, buf, (off[send], off[send + 1]), right,
                      (off[recv], off[recv + 1]), left, TAG_RING)


def allreduce(comm, buf):
    """Sum ``buf`` over ``comm`` in place (ring reduce-scatter + ring allgather)."""
    reduce_scatter(comm, buf)
    allgather(comm, buf)
