"""granger-mpi: data-parallel training on MPI clusters."""

import mpi4py

# Debian's parallel HDF5 links a libmpi.so.40 of its own (Open MPI 4.1); the one mpi4py
# was built for (Open MPI 5 from the venv) has the same soname, and whichever loads first
# wins. Importing mpi4py.MPI here loads the right one before anything imports h5py. MPI
# itself starts only when a command asks for it (runtime.world()), so that commands which
# need no MPI do not pay for starting it.
mpi4py.rc.initialize = False
mpi4py.rc.finalize = True
from mpi4py import MPI as _MPI  # noqa: E402,F401

__version__ = "0.1.0"

# The public API (granger_mpi.api), loaded on first use: the command line sets the BLAS and
# numba thread counts before numpy is imported, which importing the API here would do.
_API = ("load_job", "train", "evaluate", "predict", "Summary")
__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        from granger_mpi import api
        return getattr(api, name)
    raise AttributeError(f"module 'granger_mpi' has no attribute {name!r}")
