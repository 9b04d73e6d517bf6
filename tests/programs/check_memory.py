"""Run under mpirun: extra memory of each algorithm's first call (scratch included).

tests/test_collectives.py launches it under mpirun, always with a timeout.

numpy allocations are traced by tracemalloc; the shared window of ``shm`` is allocated by
MPI and is checked by its capacity instead. Prints ``algorithm extra/buffer`` per line on
rank 0; exits 1 if any algorithm needs more than one buffer's size (plus 64 KiB for
Python's own bookkeeping objects, which tracemalloc counts too).
"""

import sys
import tracemalloc

import numpy as np
from mpi4py import MPI

from granger_mpi import collectives
from granger_mpi.collectives import buffers, shm

world = MPI.COMM_WORLD
n = (4 << 20) // 4 + 3
SLACK = 64 << 10
worst = 0.0
for algorithm in ("native", "ring", "rhd", "rd", "shm", "hierarchical"):
    comm = world.Dup()                   # a fresh communicator: nothing cached yet
    buf = np.ones(n, np.float32)
    tracemalloc.start()
    collectives.allreduce(comm, buf, algorithm=algorithm)
    traced = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    window = 0
    comms = [comm] + [c for v in buffers.cache(comm).values()
                      for c in (v if isinstance(v, tuple) else (v,)) if isinstance(c, MPI.Comm)]
    for c in comms:
        if c != MPI.COMM_NULL:
            window += sum(v.capacity * 4 for v in buffers.cache(c).values()
                          if isinstance(v, shm.SharedSlots))
    ratio = np.array([(traced + window) / buf.nbytes])
    world.Allreduce(MPI.IN_PLACE, ratio, op=MPI.MAX)
    worst = max(worst, ratio[0] - SLACK / buf.nbytes)
    if world.Get_rank() == 0:
        print(f"{algorithm:<13} peak extra memory {ratio[0]:.3f} x buffer", flush=True)
sys.exit(0 if worst <= 1.0 else 1)
