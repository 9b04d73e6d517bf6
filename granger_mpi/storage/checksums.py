"""CRC32 of checkpoint tensors, computed where it costs least.

A checkpoint's per-tensor CRC32 is the zlib CRC of the tensor's bytes. Three things make it
cheap enough to sit on the save path:

* ranks compute the CRC of their own row slab only and the slab CRCs are combined
  (``crc32_combine``, zlib's algorithm: CRC(A + B) from CRC(A), CRC(B) and len(B)), so the
  work is split P ways and no rank waits for another's result;
* ``CrcPipeline`` runs the CRC in a helper thread chunk by chunk while the calling thread
  writes or reads the next chunk: the CRC releases the GIL on large buffers, so the
  checksum overlaps the HDF5 I/O instead of following it;
* the CRC itself is ISA-L's (``isal``): the same polynomial and values as zlib's, 4x as
  fast here (9 GB/s against 2.4, with the CPU's carry-less multiply).
"""

import functools
import threading
from queue import SimpleQueue

import numpy as np
from isal.isal_zlib import crc32 as _crc32

CHUNK_BYTES = 16 << 20      # the unit of overlap between I/O and CRC
THREAD_BYTES = 8 << 20      # below this much in all, the helper thread costs more than it saves
_POLY = 0xEDB88320          # CRC-32 (reflected), as in zlib


def crc32(array, value=0):
    """CRC32 of an array's bytes (continuing from ``value``, the CRC of what came before)."""
    return _crc32(np.ascontiguousarray(array).view(np.uint8), value)


def _multmodp(a, b):
    """a(x) * b(x) modulo the CRC polynomial (reflected bit order)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if a & (m - 1) == 0:
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


_X2N = [1 << 30]            # x^(2^k) modulo the polynomial, k = 0..31
for _ in range(31):
    _X2N.append(_multmodp(_X2N[-1], _X2N[-1]))


@functools.lru_cache(maxsize=1024)
def _shift(nbytes):
    """x^(8 * nbytes) modulo the polynomial (the same slab lengths recur every save)."""
    p, k, n = 1 << 31, 3, nbytes     # k = 3 is the factor 8
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc1, crc2, len2):
    """CRC32 of A + B from ``crc1`` = CRC32(A), ``crc2`` = CRC32(B) and ``len2`` = len(B)."""
    if crc1 == 0:       # the product below is 0 (and A is often empty: the first slab)
        return crc2
    return _multmodp(_shift(len2), crc1) ^ crc2


def combine(slab_crcs, slab_bytes):
    """The CRC of slabs end to end, from each slab's CRC and length, in order."""
    total = 0
    for crc, nbytes in zip(slab_crcs, slab_bytes):
        total = crc32_combine(total, int(crc), int(nbytes))
    return total


def chunks(length, itemsize):
    """``(lo, hi)`` element ranges of about ``CHUNK_BYTES`` covering ``length`` elements."""
    step = max(1, CHUNK_BYTES // max(1, itemsize))
    return [(lo, min(length, lo + step)) for lo in range(0, length, step)]


class CrcPipeline:
    """CRC32s of several byte streams, computed in a helper thread as chunks are fed.

    ``feed(i, chunk)`` adds the next chunk of stream ``i`` (the array must not change until
    ``results()`` returns); ``results()`` waits and returns one CRC per stream. With less
    than ``THREAD_BYTES`` in all (``total_bytes``), chunks are checksummed as they are fed.
    """

    def __init__(self, streams, total_bytes):
        self._crcs = [0] * streams
        self._queue = SimpleQueue()
        self._error = None
        self._thread = None
        self.inline = total_bytes < THREAD_BYTES   # a chunk may be reused once fed
        if not self.inline:
            self._thread = threading.Thread(target=self._work, name="crc32", daemon=True)
            self._thread.start()

    def _work(self):
        while (item := self._queue.get()) is not None:
            index, chunk = item
            try:
                self._crcs[index] = crc32(chunk, self._crcs[index])
            except Exception as exc:    # noqa: BLE001 - handed to the caller in results()
                self._error = exc

    def feed(self, index, chunk):
        if self._thread is None:
            self._crcs[index] = crc32(chunk, self._crcs[index])
        else:
            self._queue.put((index, chunk))

    def results(self):
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error
        return list(self._crcs)
