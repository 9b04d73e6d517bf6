"""Recursive halving-doubling allreduce (Rabenseifner), for any number of ranks.

A non-power-of-two world first folds its extra ranks in (``buffers.fold_in``). Then
``log2(p2)`` halving steps: partners ``d`` apart swap halves of their current window and
each adds in the half it keeps, until every rank owns one fully summed segment; then
``log2(p2)`` doubling steps copy segments back until every rank has all of them; last the
folded ranks get the result. Each element is summed by a fixed tree and then copied, so
all ranks end bitwise identical. Cost: ``2 log2(p2)`` latencies (+2 when folding),
``2(p2-1)/p2`` of the buffer sent per rank.
"""

from granger_mpi.collectives.buffers import (TAG_RHD, fold_in, fold_out, folded_rank,
                                             largest_power_of_two, scratch, segment_offsets,
                                             sendrecv_add, sendrecv_copy)


def allreduce(comm, buf):
    """Sum ``buf`` over ``comm`` in place."""
    size = comm.Get_size()
    if size == 1:
        return
    p2 = largest_power_of_two(size)
    work = scratch(comm, buf.size if p2 != size else buf.size // 2 + 1, buf.dtype)
    index = fold_in(comm, buf, work, TAG_RHD)
    if index >= 0:
        off = segment_offsets(buf.size, p2)
        lo, hi = 0, p2                       # window of segments this rank is responsible for
        distance = p2 // 2
        while distance:
            partner = folded_rank(comm, index ^ distance)
            mid = lo + distance
            if index & distance:             # keep the upper half, give the lower
                keep, give = (mid, hi), (lo, mid)
            else:
                keep, give = (lo, mid), (mid, hi)
            sendrecv_add(comm, buf, (off[give[0]], off[give[1]]), partner,
                         (off[keep[0]], off[keep[1]]), partner, work, TAG_RHD)
            lo, hi = keep
            distance //= 2
        distance = 1
        while distance < p2:
            partner = folded_rank(comm, index ^ distance)
            width = hi - lo
            other = (lo - width, lo) if index & distance else (hi, hi + width)
            sendrecv_copy(comm, buf, (off[lo], off[hi]), partner,
                          (off[other[0]], off[other[1]]), partner, TAG_RHD)
            lo, hi = min(lo, other[0]), max(hi, other[1])
            distance *= 2
    fold_out(comm, buf, TAG_RHD)
