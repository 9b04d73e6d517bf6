"""HDF5 plumbing: opening files that users hand us, with errors that name the file, and
lean attribute and row I/O for checkpoints.

h5py's high-level calls cost 0.1-0.4 ms each here (selection parsing, and an existence
check and delete before every attribute it sets); a checkpoint makes about fifty of them,
which was a third of a small save's time. The helpers below make the same HDF5 calls
h5py ends in, and store what h5py would (``h5dump`` shows no difference).
"""

from pathlib import Path

import h5py
import numpy as np
from h5py import h5a, h5d, h5o, h5p, h5s, h5t

from granger_mpi.errors import UserError

_STRING = h5py.string_dtype()           # str attributes: variable-length UTF-8, as h5py


def open_for_reading(path, what):
    """``h5py.File(path, "r")``; ``UserError`` naming ``what`` and ``path`` if that fails."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"{what} {path} is not a readable HDF5 file ({exc})") from None


def new_dataset(file, path, shape, dtype):
    """A contiguous dataset at ``path`` (groups created on the way) that HDF5 never fills
    with a fill value: every byte of it is written. Returns its low-level ``DatasetID``."""
    dcpl = h5p.create(h5p.DATASET_CREATE)
    dcpl.set_fill_time(h5d.FILL_TIME_NEVER)
    lcpl = h5p.create(h5p.LINK_CREATE)
    lcpl.set_create_intermediate_group(True)
    return h5d.create(file.id, path.encode(), h5t.py_create(np.dtype(dtype)),
                      h5s.create_simple(tuple(shape)), dcpl=dcpl, lcpl=lcpl)


def set_attr(oid, name, value):
    """Create attribute ``name`` (which must not exist) on the object with low-level id
    ``oid``, as ``attrs[name] = value`` would: str as variable-length UTF-8, numbers and
    arrays with their numpy type, scalars with a scalar dataspace."""
    data = np.array(value, dtype=_STRING if isinstance(value, str) else None)
    space = h5s.create_simple(data.shape) if data.shape else h5s.create(h5s.SCALAR)
    attr = h5a.create(oid, name.encode(), h5t.py_create(data.dtype, logical=True), space)
    attr.write(data, mtype=h5t.py_create(data.dtype))


def datasets(file):
    """``(path, DatasetID)`` of every dataset in an open file, in HDF5's visiting order."""
    found = []

    def visit(name, info):
        if info.type == h5o.TYPE_DATASET:
            found.append((name.decode(), h5d.open(file.id, name)))
    h5o.visit(file.id, visit, info=True)
    return found


def int_attr(oid, name):
    """Integer attribute ``name`` of the object with low-level id ``oid``, or None."""
    if not h5a.exists(oid, name.encode()):
        return None
    value = np.empty((), np.int64)
    h5a.open(oid, name.encode()).read(value)
    return int(value)


def _rows_space(did, lo, count):
    """The file dataspace of rows ``lo:lo + count[0]`` of a dataset."""
    space = did.get_space()
    space.select_hyperslab((lo,) + (0,) * (len(count) - 1), count)
    return space


def write_rows(did, lo, rows):
    """``dataset[lo:lo + len(rows)] = rows`` (C-contiguous ``rows``, at least one)."""
    did.write(h5s.create_simple(rows.shape), _rows_space(did, lo, rows.shape),
              np.ascontiguousarray(rows))


def read_rows(did, lo, hi, scratch=None):
    """``dataset[lo:hi]`` (``hi > lo``; a scalar dataset: its value), as a new array or, to
    spare the page faults of a fresh one, a view of ``scratch`` (bytes, large enough)."""
    shape = (hi - lo,) + tuple(did.shape[1:]) if did.shape else ()
    if scratch is None:
        out = np.empty(shape, did.dtype)
    else:
        out = scratch[:int(np.prod(shape)) * did.dtype.itemsize].view(did.dtype).reshape(shape)
    if shape:
        did.read(h5s.create_simple(shape), _rows_space(did, lo, shape), out)
    else:
        did.read(h5s.ALL, h5s.ALL, out)
    return out
