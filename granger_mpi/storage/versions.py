"""The versions of what wrote a file, recorded in its ``versions`` attribute."""

import functools
import json

import h5py
import numba
import numpy as np

import granger_mpi
from granger_mpi.mpi.runtime import mpi_library_version


def versions() -> dict:
    """Versions of granger-mpi, numpy, numba, h5py, HDF5 and the MPI library."""
    return {"granger_mpi": granger_mpi.__version__, "numpy": np.__version__,
            "numba": numba.__version__, "h5py": h5py.__version__,
            "hdf5": h5py.version.hdf5_version,
            "mpi": mpi_library_version()}


@functools.cache
def versions_json() -> str:
    """``versions()`` as JSON (the same for every file a process writes)."""
    return json.dumps(versions())
