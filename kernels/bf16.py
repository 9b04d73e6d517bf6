"""bfloat16 as it travels: the upper half of a float32, held in uint16 arrays.

Rounding is to nearest, ties to even (as hardware does); a NaN stays a NaN (its quiet bit is
set, so rounding cannot carry it into an infinity). Decoding is exact: a bf16 value is a
float32 whose low 16 bits are zero.
"""

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def encode(x, out):
    """``out[i]`` = bf16 of float32 ``x[i]``, rounded to nearest even."""
    bits = x.view(np.uint32)
    for i in range(x.size):
        u = bits[i]
        if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):       # NaN
            out[i] = np.uint16((u >> np.uint32(16)) | np.uint32(0x0040))
        else:
            u = u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
            out[i] = np.uint16(u >> np.uint32(16))


@njit(cache=True, nogil=True)
def decode(h, out):
    """``out[i]`` = float32 of bf16 ``h[i]`` (exact)."""
    bits = out.view(np.uint32)
    for i in range(h.size):
        bits[i] = np.uint32(h[i]) << np.uint32(16)


@njit(cache=True, nogil=True)
def add_decoded(h, acc):
    """``acc[i] += float32 of bf16 h[i]``: a partial sum received, accumulated in float32."""
    for i in range(h.size):
        acc[i] += np.uint32(np.uint32(h[i]) << np.uint32(16)).view(np.float32)

