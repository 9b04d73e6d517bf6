"""What the hand-written collectives share: segment bounds, cached scratch, the exchange steps.

Scratch buffers and sub-communicators are cached on the communicator itself as an MPI
attribute, so they are made once per (communicator, size), reused by every call, and freed
with the communicator (after a shrink, the new communicator starts with a fresh cache).
"""

import numpy as np
from mpi4py import MPI

# Each algorithm uses its own tag, so a message of one can never match a receive of another.
TAG_RING = 0x6701
TAG_RHD = 0x6702
TAG_RD = 0x6703
TAG_HIER = 0x6704
TAG_FOLD = 0x6705

# Segments longer than this travel as several messages, so that adding one piece overlaps
# receiving the next. Measured on 2 cores over shared memory (docs/performance.md): pieces of
# 16K-64K elements made a 1-4 MiB ring 1.3-2x slower than one blocking Sendrecv per segment,
# since each piece pays its own rendezvous; so only very long segments are cut.
PIPELINE_ELEMENTS = 1 << 21

_keyval = None

# Fault injection (``collectives.fail_after_next_exchange``): called once, then cleared,
# after the next point-to-point exchange of a hand-written algorithm.
after_exchange = None


def exchanged():
    """Run and clear the ``after_exchange`` hook (one attribute test when none is set)."""
    global after_exchange
    if after_exchange is not None:
        hook, after_exchange = after_exchange, None
        hook()


def cache(comm):
    """The dict cached on ``comm`` (created on first use)."""
    global _keyval
    if _keyval is None:
        _keyval = MPI.Comm.Create_keyval()
    found = comm.Get_attr(_keyval)
    if found is None:
        found = {}
        comm.Set_attr(_keyval, found)
    return found


def scratch(comm, length, dtype):
    """A reusable array of ``length`` elements of ``dtype`` (a numpy dtype), one per communicator.

    Grows when a longer one is asked for; the peak extra memory of a call is this array.
    """
    store = cache(comm)
    key = ("scratch", dtype.char)
    buf = store.get(key)
    if buf is None or buf.size < length:
        buf = np.empty(max(length, 1), dtype)
        store[key] = buf
    return buf[:length]


def segment_offsets(n, parts):
    """``parts + 1`` offsets cutting ``n`` elements into near-equal contiguous segments."""
    return [(n * i) // parts for i in range(parts + 1)]


def sendrecv_add(comm, buf, send, dest, recv, source, work, tag):
    """Send ``buf[send]`` to ``dest`` while ``buf[recv] += (source's buf[recv])``.

    ``send`` and ``recv`` are ``(lo, hi)`` element ranges that do not overlap; ``work`` is
    scratch of at least ``recv`` length. Segments travel in pieces, and each piece is added
    as soon as it arrives while later ones are still in flight.
    """
    s_lo, s_hi = send
    r_lo, r_hi = recv
    if max(s_hi - s_lo, r_hi - r_lo) <= PIPELINE_ELEMENTS:
        comm.Sendrecv(buf[s_lo:s_hi], dest, tag, work[:r_hi - r_lo], source, tag)
        np.add(buf[r_lo:r_hi], work[:r_hi - r_lo], out=buf[r_lo:r_hi])
        exchanged()
        return
    pieces = range(0, r_hi - r_lo, PIPELINE_ELEMENTS)
    receives = [comm.Irecv(work[o:min(r_hi - r_lo, o + PIPELINE_ELEMENTS)], source, tag) for o in pieces]
    sends = [comm.Isend(buf[s_lo + o:min(s_hi, s_lo + o + PIPELINE_ELEMENTS)], dest, tag)
             for o in range(0, s_hi - s_lo, PIPELINE_ELEMENTS)]
    for request, o in zip(receives, pieces):
        request.Wait()
        hi = min(r_hi, r_lo + o + PIPELINE_ELEMENTS)
        np.add(buf[r_lo + o:hi], work[o:hi - r_lo], out=buf[r_lo + o:hi])
    MPI.Request.Waitall(sends)
    exchanged()


def sendrecv_copy(comm, buf, send, dest, recv, source, tag):
    """Send ``buf[send]`` to ``dest`` while receiving ``buf[recv]`` from ``source``."""
    s_lo, s_hi = send
    r_lo, r_hi = recv
    comm.Sendrecv(buf[s_lo:s_hi], dest, tag, buf[r_lo:r_hi], source, tag)
    exchanged()


def largest_power_of_two(p):
    """The largest power of two not above ``p``."""
    return 1 << (p.bit_length() - 1)


def folded_index(rank, size):
    """``rank``'s index among the ``p2`` ranks that go on after a fold, or -1 if it sits out.

    Of the first ``2 * (size - p2)`` ranks, the even ones sit out and the odd ones go on.
    """
    extra = size - largest_power_of_two(size)
    if rank < 2 * extra:
        return -1 if rank % 2 == 0 else rank // 2
    return rank - extra


def fold_in(comm, buf, work, tag):
    """Fold a non-power-of-two world onto its largest power of two ``p2``.

    The first ``2 * (P - p2)`` ranks pair up: each even one sends its buffer to the odd
    one after it, which adds it in. Returns this rank's index among the ``p2`` ranks that go
    on, or -1 for a rank that sits out until ``fold_out``.
    """
    rank = comm.Get_rank()
    index = folded_index(rank, comm.Get_size())
    if index < 0:
        comm.Send(buf, rank + 1, tag)
    elif rank < 2 * (comm.Get_size() - largest_power_of_two(comm.Get_size())):
        comm.Recv(work[:buf.size], rank - 1, tag)
        np.add(buf, work[:buf.size], out=buf)
    exchanged()
    return index


def fold_out(comm, buf, tag):
    """Give the ranks that sat out of a fold the finished result."""
    rank, size = comm.Get_rank(), comm.Get_size()
    extra = size - largest_power_of_two(size)
    if rank < 2 * extra:
        if rank % 2 == 0:
            comm.Recv(buf, rank + 1, tag)
        else:
            comm.Send(buf, rank - 1, tag)


def folded_rank(comm, index):
    """The world rank of the ``index``-th rank that goes on after ``fold_in``."""
    extra = comm.Get_size() - largest_power_of_two(comm.Get_size())
    return 2 * index + 1 if index < extra else index + extra
