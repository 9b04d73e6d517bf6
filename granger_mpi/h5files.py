"""Opening HDF5 files that users hand us, with errors that name the file."""

from pathlib import Path

import h5py

from granger_mpi.errors import UserError


def open_for_reading(path, what):
    """``h5py.File(path, "r")``; ``UserError`` naming ``what`` and ``path`` if that fails."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} not found")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"{what} {path} is not a readable HDF5 file ({exc})") from None
