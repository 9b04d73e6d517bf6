"""Checksums of a dataset's rows: written once, checked on every read.

``/integrity/X`` and ``/integrity/y`` hold one CRC32 per block of ``block_rows`` rows (an
attribute of ``/integrity``), computed over the decoded values as h5py returns them
(little-endian, in the stored dtype), not over HDF5 chunks or compressed bytes: a file
made elsewhere, chunked or filtered any way, gets the same checksums for the same values.
Blocks are the windows of the partition rule (``partition.window_rows``), so a rank
streaming its share reads and checks whole blocks.
"""

import h5py
import numpy as np
from mpi4py import MPI

from granger_mpi.data import partition
from granger_mpi.mpi.runtime import gather_text
from granger_mpi.storage.checksums import crc32

GROUP = "integrity"
NAMES = ("X", "y")


class DamagedData(Exception):
    """Rows whose values do not match their stored checksum. ``step_item`` is set by the
    reader that met it: ``(epoch, step, batch_len, rows)`` of the step it was reading for."""

    def __init__(self, path, name, lo, hi, stored, found):
        self.path, self.name, self.lo, self.hi = path, name, lo, hi
        self.step_item = None
        super().__init__(f"{path}: /{name} rows [{lo}, {hi}) do not match their checksum "
                         f"(stored crc32 {stored:08x}, read {found:08x}): the file is damaged")


def fingerprint(path):
    """What identifies a dataset's values, cheaply: ``{"sample": ..., "blocks": ...}``. The
    sample (shape, dtypes and a CRC of up to 192 rows: the first, middle and last 64) is
    always there; the CRC of the block checksums, which covers every value, when the file
    has them."""
    with h5py.File(path, "r") as f:
        X, y = f["X"], f["y"]
        n, crc = X.shape[0], 0
        for lo in sorted({0, max(0, n // 2 - 32), max(0, n - 64)}):
            crc = crc32(y[lo:lo + 64], crc32(X[lo:lo + 64], crc))
        out = {"sample": f"{X.shape} {X.dtype} {y.shape} {y.dtype} crc32 {crc:08x}"}
        group = f.get(GROUP)
        if group is not None and all(name in group for name in NAMES):
            crc = crc32(group["y"][...], crc32(group["X"][...]))
            out["blocks"] = f"{group['X'].shape[0]} blocks of {int(group.attrs['block_rows'])} rows, crc32 {crc:08x}"
        return out


def block_rows_for(X, y):
    """Rows per checksum block for the datasets ``X`` and ``y`` (as they are stored)."""
    per_row = X.dtype.itemsize * X.shape[1] + y.dtype.itemsize * int(np.prod(y.shape[1:]))
    return partition.window_rows(per_row)


def block_crcs(array, block_rows):
    """CRC32 of each block of ``block_rows`` rows of ``array`` (little-endian bytes)."""
    array = np.ascontiguousarray(array, array.dtype.newbyteorder("<"))
    return np.array([crc32(array[i:i + block_rows]) for i in range(0, len(array), block_rows)],
                    np.uint32)


def add(f, comm=None, progress=None):
    """Write ``/integrity`` into the open file ``f``; an existing one is replaced. Given
    ``comm``, collective over it (``f`` opened with the mpio driver): every rank checksums
    a contiguous share of the blocks."""
    X, y = f["X"], f["y"]
    n_rows, block = X.shape[0], block_rows_for(X, y)
    n_blocks = -(-n_rows // block)
    if GROUP in f:
        del f[GROUP]
    group = f.create_group(GROUP)
    group.attrs["block_rows"] = block
    group.attrs["algorithm"] = "crc32 (zlib) of each block's values, little-endian, as stored"
    out = {name: group.create_dataset(name, (n_blocks,), np.uint32) for name in NAMES}
    lo, hi = (0, n_blocks) if comm is None else \
        partition.rank_bounds(n_blocks, comm.Get_size(), comm.Get_rank())
    step = max(1, (64 << 20) // (block * X.dtype.itemsize * X.shape[1]))   # blocks per read
    for first in range(lo, hi, step):
        last = min(hi, first + step)
        for name, source in (("X", X), ("y", y)):
            out[name][first:last] = block_crcs(source[first * block:min(n_rows, last * block)], block)
        if progress is not None:
            progress(last - lo, hi - lo)


class Checker:
    """Verified reads of row ranges of an open dataset file (plain reads if it has no
    ``/integrity``). Reads cover whole blocks, so a range is widened to block bounds."""

    def __init__(self, f, path):
        self.path = path
        self.X, self.y = f["X"], f["y"]
        self.n_rows = self.X.shape[0]
        group = f.get(GROUP)
        self.enabled = group is not None and all(name in group for name in NAMES)
        if self.enabled:
            self.block = int(group.attrs["block_rows"])
            self.crcs = {name: group[name] for name in NAMES}

    def read(self, lo, hi):
        """``(X[lo:hi], y[lo:hi])`` in the stored dtypes, each block checked."""
        if not self.enabled or hi <= lo:
            return self.X[lo:hi], self.y[lo:hi]
        first, last = lo // self.block, -(-hi // self.block)
        start, stop = first * self.block, min(self.n_rows, last * self.block)
        out = []
        for name, source in (("X", self.X), ("y", self.y)):
            values = source[start:stop]
            stored = self.crcs[name][first:last]
            found = block_crcs(values, self.block)
            bad = np.flatnonzero(found != stored)
            if bad.size:
                b = first + int(bad[0])
                raise DamagedData(self.path, name, b * self.block,
                                  min(self.n_rows, (b + 1) * self.block),
                                  int(stored[bad[0]]), int(found[bad[0]]))
            out.append(values[lo - start:hi - start])
        return tuple(out)


def verify(comm, path, progress=None):
    """Collective: check every block of ``path`` (each rank a contiguous share). Returns
    ``(checked blocks, damaged blocks, their messages)``, the messages on rank 0 only (an
    empty list elsewhere); None if the file has no checksums."""
    with h5py.File(path, "r") as f:
        checker = Checker(f, path)
        if not checker.enabled:
            return None
        n_blocks = -(-checker.n_rows // checker.block)
        lo, hi = partition.rank_bounds(n_blocks, comm.Get_size(), comm.Get_rank())
        found = []
        for b in range(lo, hi):    # block by block: one message per damaged block
            try:
                checker.read(b * checker.block, min(checker.n_rows, (b + 1) * checker.block))
            except DamagedData as damage:
                found.append(str(damage))
            if progress is not None:
                progress(b + 1 - lo, hi - lo)
    damaged = np.array([len(found)], np.int64)
    comm.Allreduce(MPI.IN_PLACE, damaged, op=MPI.SUM)
    messages = [m for part in gather_text(comm, "\n".join(found)) for m in part.splitlines()]
    return n_blocks, int(damaged[0]), messages
