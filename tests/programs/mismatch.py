"""Run under mpirun with GRANGER_CHECK_COLLECTIVES=1: rank 1 passes a shorter buffer.

tests/test_collectives.py launches it under mpirun, always with a timeout.
"""

import numpy as np
from mpi4py import MPI

from granger_mpi import collectives

comm = MPI.COMM_WORLD
buf = np.ones(10 if comm.Get_rank() != 1 else 9, np.float32)
try:
    collectives.allreduce(comm, buf, algorithm="ring")
except collectives.CollectiveMismatch as exc:
    print(f"rank {comm.Get_rank()} caught: {exc}", flush=True)
else:
    print(f"rank {comm.Get_rank()} was not stopped", flush=True)
