"""Gradient exchange: one public ``allreduce`` over interchangeable algorithms.

Contract of every algorithm: collective over ``comm``; in place on a contiguous float32 or
float64 numpy array; the result is the elementwise sum (or mean) over ranks and is
bitwise identical on every rank and on every run at the same world size.
"""

import numpy as np

from granger_mpi.collectives import native

ALGORITHMS = {"native": native.allreduce}
OPS = ("sum", "mean")


def allreduce(comm, buf, *, algorithm="native", op="sum"):
    """Reduce ``buf`` over ``comm`` in place with the named algorithm.

    Collective over ``comm``: every rank calls it with the same algorithm, op, dtype and
    length. Returns ``buf``.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown allreduce algorithm {algorithm!r}; known: {', '.join(ALGORITHMS)}")
    if op not in OPS:
        raise ValueError(f"unknown reduction op {op!r}; known: {', '.join(OPS)}")
    if buf.dtype not in (np.float32, np.float64) or not buf.flags.c_contiguous:
        raise ValueError(f"allreduce needs a contiguous float32/float64 array, got {buf.dtype} "
                         f"(contiguous: {buf.flags.c_contiguous})")
    ALGORITHMS[algorithm](comm, buf)
    if op == "mean":
        buf /= comm.Get_size()
    return buf
