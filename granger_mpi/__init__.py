"""granger-mpi: data-parallel training on MPI clusters."""

import os
import signal
import sys

# The command line (``granger-mpi``, ``python -m granger_mpi``; ``-m`` while the package
# is located): SIGUSR1 asks for a checkpoint, which only the training loop acts on, and
# its default action kills the process, so it is ignored from the first statement on (a
# scheduler's signal in a rank's first second killed it). Before the first step there is
# nothing newer than the checkpoint the run starts from to save. A library import leaves
# the caller's handlers alone.
if sys.argv and (sys.argv[0] == "-m" or os.path.basename(sys.argv[0]) == "granger-mpi"):
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)

import mpi4py  # noqa: E402

# Debian's parallel HDF5 links a libmpi.so.40 of its own (Open MPI 4.1); the one mpi4py
# was built for (Open MPI 5 from the venv) has the same soname, and whichever loads first
# wins. Importing mpi4py.MPI here loads the right one before anything imports h5py. MPI
# itself starts only when a command asks for it (runtime.world()), so that commands which
# need no MPI do not pay for starting it.
mpi4py.rc.initialize = False
mpi4py.rc.finalize = True
from mpi4py import MPI as _MPI  # noqa: E402,F401

__version__ = "0.2.0"

# The public API (granger_mpi.api), loaded on first use: the command line sets the BLAS and
# numba thread counts before numpy is imported, which importing the API here would do.
_API = ("load_job", "train", "evaluate", "predict", "Summary")
__all__ = list(_API)


def __getattr__(name):
    if name in _API:
        from granger_mpi import api
        return getattr(api, name)
    raise AttributeError(f"module 'granger_mpi' has no attribute {name!r}")
