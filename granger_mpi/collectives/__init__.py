"""Gradient exchange: one public ``allreduce`` over interchangeable algorithms.

Contract of every algorithm: collective over ``comm``; in place on a contiguous float32 or
float64 numpy array; afterwards every rank holds the elementwise sum (or mean) over ranks,
bitwise identical on every rank and on every run at the same world size (the order of
additions is fixed by rank, never by timing).

Algorithms: ``native`` (``MPI_Allreduce``, the reference), ``ring``, ``rhd`` (recursive
halving-doubling), ``rd`` (recursive doubling), ``shm`` (shared memory, one node only),
``hierarchical`` (within nodes, then between node leaders), and ``auto``, which picks one per call from the cost model in
``auto.py`` and logs each choice once per size. ``compression="bf16"`` sends bfloat16 on the
wire around the ring, summing in float32 (``compressed.py``): deterministic and bitwise the
same on every rank, but not the float32 sum.

Set ``GRANGER_CHECK_COLLECTIVES=1`` to make every call first agree on (algorithm, count,
dtype) across ranks: a mismatch then fails with the ranks named instead of hanging.
"""

import os

import numpy as np
from granger_mpi.collectives import (auto, buffers, compressed, hierarchical, native, rd, rhd, ring,
                                     shm)

ALGORITHMS = ("native", "ring", "rhd", "rd", "shm", "hierarchical", "auto")
# Those that survive a rank failure under ULFM (an error, not a hang): point-to-point and
# MPI's own. ``shm`` and ``hierarchical`` use shared-memory windows, which ULFM cannot repair.
FAULT_TOLERANT = ("native", "ring", "rhd", "rd")
OPS = ("sum", "mean")
COMPRESSIONS = compressed.COMPRESSIONS
_IMPLEMENTATIONS = {"native": native.allreduce, "ring": ring.allreduce, "rhd": rhd.allreduce,
                    "rd": rd.allreduce, "shm": shm.allreduce,
                    "hierarchical": hierarchical.allreduce}
# MPI counts are C ints: longer buffers go as several calls of at most this many elements.
MAX_COUNT = int(os.environ.get("GRANGER_COLLECTIVE_MAX_COUNT", 1 << 30))
CHECK_AGREEMENT = os.environ.get("GRANGER_CHECK_COLLECTIVES") == "1"   # read once, at import
_last_auto = (None, -1, None)   # (communicator, bytes, algorithm) of the latest auto call


class CollectiveMismatch(RuntimeError):
    """Ranks entered the same collective with different arguments."""


def fail_after_next_exchange(hook):
    """Fault injection: call ``hook()`` once, after this rank's next point-to-point exchange
    inside a hand-written algorithm, so that a rank can die mid-collective (``native`` has
    no such point: MPI's insides)."""
    buffers.after_exchange = hook


def pieces(n, limit):
    """``(lo, hi)`` ranges of at most ``limit`` elements covering ``range(n)``."""
    return [(lo, min(n, lo + limit)) for lo in range(0, n, limit)]


def _check_agreement(comm, algorithm, buf):
    """Fail on every rank, naming the odd ones, if ranks disagree on what they call."""
    mine = np.array([ALGORITHMS.index(algorithm), buf.size, buf.dtype.num], np.int64)
    everyone = np.empty((comm.Get_size(), 3), np.int64)
    comm.Allgather(mine, everyone)
    odd = [r for r in range(comm.Get_size()) if not np.array_equal(everyone[r], everyone[0])]
    if odd:
        described = "; ".join(
            f"rank {r}: {ALGORITHMS[row[0]]}, {row[1]} x {_dtype_name(row[2])}"
            for r, row in enumerate(everyone) if r == 0 or r in odd)
        raise CollectiveMismatch(f"allreduce called with different arguments on different ranks "
                                 f"({described}); ranks {odd} differ from rank 0")


def _dtype_name(num):
    for dtype in (np.float32, np.float64):
        if np.dtype(dtype).num == num:
            return np.dtype(dtype).name
    return f"dtype #{num}"


def in_use(comm, nbytes, algorithm):
    """What ``allreduce`` runs for ``algorithm`` on ``comm`` and ``nbytes`` (for a progress
    line): ``auto`` as ``auto (ring)`` once it has chosen, other names as they are. No
    communication."""
    if algorithm != "auto":
        return algorithm
    last = _last_auto
    return f"auto ({last[2]})" if last[0] is comm and last[1] == nbytes else "auto"


def allreduce(comm, buf, *, algorithm="auto", op="sum", ranks_per_node=None, compression="none"):
    """Reduce ``buf`` over ``comm`` in place with the named algorithm; returns ``buf``.

    Collective over ``comm``: every rank calls it with the same algorithm, op, dtype and
    length. ``ranks_per_node`` emulates nodes of that many consecutive ranks for
    ``hierarchical`` (default: nodes are the ranks that share memory). ``compression``
    ``"bf16"`` runs the compressed ring (``algorithm`` must be ``ring`` or ``auto``).
    """
    if compression != "none":
        if compression not in COMPRESSIONS or algorithm not in ("ring", "auto"):
            raise ValueError(f"compression {compression!r} with algorithm {algorithm!r}: known "
                             f"compressions {', '.join(COMPRESSIONS)}, on 'ring' or 'auto' only")
        for lo, hi in pieces(buf.size, MAX_COUNT):
            compressed.allreduce(comm, buf[lo:hi])
        if op == "mean":
            buf /= comm.Get_size()
        return buf
    # Kept lean: at a few bytes this wrapper's own cost is measured against MPI_Allreduce.
    if buf.dtype.char not in "fd" or buf.ndim != 1 or not buf.flags.c_contiguous:
        raise ValueError(f"allreduce needs a 1-D contiguous float32/float64 array, got "
                         f"{buf.ndim}-D {buf.dtype} (contiguous: {buf.flags.c_contiguous})")
    if op != "sum" and op != "mean":
        raise ValueError(f"unknown reduction op {op!r}; known: {', '.join(OPS)}")
    global _last_auto
    if algorithm == "auto":
        if CHECK_AGREEMENT:
            _check_agreement(comm, algorithm, buf)
        if buf.size == 0 or comm.Get_size() == 1:
            return buf
        last = _last_auto     # a training loop asks again and again for the same size
        if last[0] is comm and last[1] == buf.nbytes:
            algorithm = last[2]
        else:
            algorithm = auto.choose(comm, buf.nbytes)
            _last_auto = (comm, buf.nbytes, algorithm)
    else:
        if algorithm not in _IMPLEMENTATIONS:
            raise ValueError(f"unknown allreduce algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
        if CHECK_AGREEMENT:
            _check_agreement(comm, algorithm, buf)
        if buf.size == 0 or comm.Get_size() == 1:
            return buf
    implementation = _IMPLEMENTATIONS[algorithm]
    extra = (ranks_per_node,) if algorithm == "hierarchical" else ()
    if buf.size <= MAX_COUNT:
        implementation(comm, buf, *extra)
    else:
        for lo, hi in pieces(buf.size, MAX_COUNT):
            implementation(comm, buf[lo:hi], *extra)
    if op == "mean":
        buf /= comm.Get_size()
    return buf


def allocate(comm, n, dtype=np.float32):
    """A zeroed buffer for repeated allreduces: in shared memory when all ranks share a node.

    Collective over ``comm``. ``shm`` (and so ``auto``) reduces such a buffer without first
    copying it into shared memory; every algorithm accepts it like any other array.
    """
    if comm.Get_size() > 1 and shm.on_one_node(comm):
        return shm.allocate(comm, n, dtype)
    return np.zeros(n, dtype)


def reduce_scatter(comm, buf):
    """Sum over ``comm`` so that rank ``r`` holds segment ``r`` of the sum; returns its bounds.

    Collective; in place; segments are near-equal and contiguous (``ring.reduce_scatter``).
    """
    return ring.reduce_scatter(comm, buf)


def allgather(comm, buf):
    """Every rank contributes its segment of ``buf`` (as left by ``reduce_scatter``)."""
    ring.allgather(comm, buf)
