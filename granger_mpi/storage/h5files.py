"""HDF5 plumbing: opening files that users hand us, with errors that name the file, and
lean attribute and row I/O for checkpoints.

h5py's high-level calls cost 0.1-0.4 ms each here (selection parsing, and an existence
check and delete before every attribute it sets); a checkpoint makes about fifty of them,
which was a third of a small save's time. The helpers below make the same HDF5 calls
h5py ends in, and store what h5py would (``h5dump`` shows no difference).
"""

import functools
import json
import math
from pathlib import Path

import h5py
import numpy as np
from h5py import h5a, h5d, h5f, h5o, h5p, h5s, h5t
from mpi4py import MPI

from granger_mpi.errors import UserError
from granger_mpi.storage import seal

_STRING = h5py.string_dtype()           # str attributes: variable-length UTF-8, as h5py


def _property_list(cls, **settings):
    plist = h5p.create(cls)
    for name, value in settings.items():
        getattr(plist, f"set_{name}")(*value if isinstance(value, tuple) else (value,))
    return plist


# Property lists and types are made once: each new h5py object costs a few microseconds
# of registry work, and a save made about 150 of them.
_CONTIGUOUS_UNFILLED = _property_list(h5p.DATASET_CREATE, fill_time=h5d.FILL_TIME_NEVER)
_WITH_PARENTS = _property_list(h5p.LINK_CREATE, create_intermediate_group=True)
# Closing the file closes every object still open in it (as ``h5py.File.close``), so the
# file is complete on disk when ``close`` returns.
# The 1.10 file format checksums the superblock and every object header, so damaged
# metadata is an error at open or read rather than HDF5 parsing garbage (a fuzzed file in
# the old format could make it loop forever); h5dump and h5py read it since HDF5 1.10.
LIBVER = (h5f.LIBVER_V110, h5f.LIBVER_LATEST)
_SERIAL_ACCESS = _property_list(h5p.FILE_ACCESS, fclose_degree=h5f.CLOSE_STRONG, libver_bounds=LIBVER)
_SCALAR = h5s.create(h5s.SCALAR)
_SEALABLE = _property_list(h5p.FILE_CREATE, userblock=seal.USER_BLOCK)   # room for the seal


@functools.lru_cache(maxsize=None)
def _types(dtype):
    """(file type, memory type) of a numpy dtype, as h5py stores it."""
    return h5t.py_create(dtype, logical=True), h5t.py_create(dtype)


def json_attr(f, name, path):
    """The JSON attribute ``name`` of the open file ``f``, decoded; ``UserError`` naming
    ``path`` if it is missing or not JSON (a file written by something else, or damaged)."""
    value = f.attrs.get(name)
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        state = "missing" if value is None else "not JSON"
        raise UserError(f"{path}: its attribute {name!r} is {state}: not a file granger-mpi "
                        f"wrote, or damaged") from None


def open_for_reading(path, what):
    """``h5py.File(path, "r")``; ``UserError`` naming ``what`` and ``path`` if that fails."""
    return h5py.File(open_file(path, what))


def open_file(path, what):
    """The low-level ``FileID`` of ``path`` opened read-only (its ``close()`` closes all
    that was opened in it); ``UserError`` naming ``what`` and ``path`` if that fails."""
    try:
        return h5f.open(str(path).encode(), h5f.ACC_RDONLY, fapl=_SERIAL_ACCESS)
    except OSError as exc:
        if not Path(path).is_file():
            raise UserError(f"{what} {path} not found") from None
        raise UserError(f"{what} {path} is not a readable HDF5 file ({exc})") from None


def create_file(path, comm=None):
    """A new (truncated) HDF5 file, written by this process alone with the sec2 driver or,
    given ``comm``, by all its ranks through the mpio driver (collective), with a user
    block for its ``seal``. Returns the low-level ``FileID``; its ``close()`` closes
    everything opened in it."""
    fapl = _SERIAL_ACCESS
    if comm is not None:
        fapl = _property_list(h5p.FILE_ACCESS, fclose_degree=h5f.CLOSE_STRONG, libver_bounds=LIBVER)
        fapl.set_fapl_mpio(comm, MPI.INFO_NULL)
    return h5f.create(str(path).encode(), h5f.ACC_TRUNC, fcpl=_SEALABLE, fapl=fapl)


def new_dataset(fid, path, shape, dtype):
    """A contiguous dataset at ``path`` (groups created on the way) in the file ``fid`` that
    HDF5 never fills with a fill value: every byte of it is written. Returns its low-level
    ``DatasetID``."""
    return h5d.create(fid, path.encode(), _types(np.dtype(dtype))[0],
                      h5s.create_simple(tuple(shape)), dcpl=_CONTIGUOUS_UNFILLED, lcpl=_WITH_PARENTS)


def set_attr(oid, name, value):
    """Create attribute ``name`` (which must not exist) on the object with low-level id
    ``oid``, as ``attrs[name] = value`` would: str as variable-length UTF-8, numbers and
    arrays with their numpy type, scalars with a scalar dataspace."""
    data = np.array(value, dtype=_STRING if isinstance(value, str) else None)
    space = h5s.create_simple(data.shape) if data.shape else _SCALAR
    file_type, memory_type = _types(data.dtype)
    h5a.create(oid, name.encode(), file_type, space).write(data, mtype=memory_type)


def datasets(fid, paths=None):
    """``(path, DatasetID)`` of every dataset in the open file ``fid``, in HDF5's visiting
    order; given ``paths``, of those (``KeyError`` if one is missing), without the visit."""
    if paths is not None:
        return [(path, h5d.open(fid, path.encode())) for path in paths]
    found = []

    def visit(name, info):
        if info.type == h5o.TYPE_DATASET:
            found.append((name.decode(), h5d.open(fid, name)))
    h5o.visit(fid, visit, info=True)
    return found


def _open_attr(oid, name):
    """Attribute ``name`` of the object with low-level id ``oid``, or None if it has none
    (one call where asking first would make two)."""
    try:
        return h5a.open(oid, name.encode())
    except KeyError:
        return None


def int_attr(oid, name):
    """Integer attribute ``name`` of the object with low-level id ``oid``, or None."""
    attr = _open_attr(oid, name)
    if attr is None:
        return None
    value = np.empty((), np.int64)
    attr.read(value)
    return int(value)


def str_attr(oid, name):
    """String attribute ``name`` of the object with low-level id ``oid``, or None (also when
    it holds no string)."""
    attr = _open_attr(oid, name)
    if attr is None or attr.get_type().get_class() != h5t.STRING:
        return None
    value = np.empty((), _STRING)
    attr.read(value, mtype=_types(_STRING)[1])
    value = value[()]
    return value.decode() if isinstance(value, bytes) else value


def _rows_space(did, lo, count):
    """The file dataspace of rows ``lo:lo + count[0]`` of a dataset."""
    space = did.get_space()
    space.select_hyperslab((lo,) + (0,) * (len(count) - 1), count)
    return space


def write_rows(did, lo, rows, dataset_rows=None):
    """``dataset[lo:lo + len(rows)] = rows`` (C-contiguous ``rows``, at least one). Given the
    dataset's row count ``dataset_rows``, a write of all its rows needs no selection."""
    rows = np.ascontiguousarray(rows)
    memory_type = _types(rows.dtype)[1]     # h5py would make a new one for every call
    if lo == 0 and len(rows) == dataset_rows:
        did.write(h5s.ALL, h5s.ALL, rows, mtype=memory_type)
    else:
        did.write(h5s.create_simple(rows.shape), _rows_space(did, lo, rows.shape), rows,
                  mtype=memory_type)


def stored_layout(did):
    """``(dims, file type)`` of a dataset: its dims (a scalar's: ``(1,)``, one row) and the
    type of its elements as stored."""
    return did.shape or (1,), did.get_type()


def read_rows(did, lo, hi, scratch, layout):
    """The bytes of rows ``lo:hi`` (``hi > lo``) of a dataset of numbers exactly as stored
    (read with the file's own type: no conversion, and no numpy dtype to build), as a view
    of ``scratch`` (bytes, large enough: reused, it spares the page faults of a fresh
    array). ``layout``: ``stored_layout(did)``."""
    dims, file_type = layout
    if file_type.get_class() not in (h5t.INTEGER, h5t.FLOAT):    # no pointers to read raw
        raise TypeError("a dataset of other elements than numbers")
    row_shape = (hi - lo,) + dims[1:]
    out = scratch[:math.prod(row_shape) * file_type.get_size()]
    if lo == 0 and hi == dims[0]:    # the whole dataset (or a scalar): no selection needed
        did.read(h5s.ALL, h5s.ALL, out, mtype=file_type)
    else:
        did.read(h5s.create_simple(row_shape), _rows_space(did, lo, row_shape), out,
                 mtype=file_type)
    return out
