"""A trivial parallel kernel: running it starts numba's threading layer so it can be named."""

import numba
from numba import njit


@njit(parallel=True, cache=True)
def touch(a):
    """Add 1 to each element with ``prange`` (used by ``doctor``)."""
    for i in numba.prange(a.shape[0]):
        a[i] += 1.0
