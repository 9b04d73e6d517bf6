"""Run under mpirun: every algorithm against MPI_Allreduce, over sizes and dtypes.

tests/test_collectives.py launches it under mpirun, always with a timeout.

Prints one line per failed case on rank 0 and exits 1 if any case failed on any rank.
Arguments: ``ranks_per_node`` for the hierarchical algorithm ("-": the real node split),
then optionally the largest buffer length (default 2^20 + 3).
"""

import sys
import zlib

import numpy as np
from mpi4py import MPI

from granger_mpi import collectives
from granger_mpi.collectives import shm

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
ranks_per_node = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1] != "-" else None
largest = int(sys.argv[2]) if len(sys.argv) > 2 else 2**20 + 3
SIZES = sorted({0, 1, max(size - 1, 0), size, 1000, largest})
failures = []
# 'shm' works only when every rank shares one node; across hosts it must refuse, not hang.
ALGORITHMS = [a for a in collectives.ALGORITHMS if a != "shm" or shm.on_one_node(comm)]
if "shm" not in ALGORITHMS:
    try:
        collectives.allreduce(comm, np.ones(4), algorithm="shm")
        failures.append(f"shm did not refuse a communicator spanning several nodes on rank {rank}")
    except ValueError:
        pass


def agreed_crc(buf):
    crcs = np.empty(size, np.int64)
    comm.Allgather(np.array([zlib.crc32(buf.view(np.uint8))], np.int64), crcs)
    return np.unique(crcs).size == 1


for dtype in (np.float32, np.float64):
    eps = np.finfo(dtype).eps
    for n in SIZES:
        rng = np.random.default_rng([rank, n, dtype(0).itemsize])
        data = {"random": rng.normal(size=n).astype(dtype),
                "integer": rng.integers(-1000, 1000, n).astype(dtype)}
        for kind, x in data.items():
            reference = x.copy()
            comm.Allreduce(MPI.IN_PLACE, reference, op=MPI.SUM)
            magnitude = np.abs(x)
            comm.Allreduce(MPI.IN_PLACE, magnitude, op=MPI.SUM)
            shared = collectives.allocate(comm, n, dtype)
            for algorithm in ALGORITHMS:
                got = x.copy()
                collectives.allreduce(comm, got, algorithm=algorithm, ranks_per_node=ranks_per_node)
                again = x.copy()
                collectives.allreduce(comm, again, algorithm=algorithm, ranks_per_node=ranks_per_node)
                case = f"{algorithm} n={n} {np.dtype(dtype).name} {kind}"
                if kind == "integer":
                    ok = np.array_equal(got, reference)
                else:
                    ok = bool(np.all(np.abs(got - reference) <= 2 * size * eps * magnitude + 1e-30))
                if not ok:
                    failures.append(f"{case}: differs from MPI_Allreduce on rank {rank}")
                if not agreed_crc(got):
                    failures.append(f"{case}: ranks hold different bits")
                if not np.array_equal(got.view(np.uint8), again.view(np.uint8)):
                    failures.append(f"{case}: a second call gave different bits on rank {rank}")
                shared[:] = x    # the same through a buffer from collectives.allocate
                collectives.allreduce(comm, shared, algorithm=algorithm, ranks_per_node=ranks_per_node)
                if not np.array_equal(shared.view(np.uint8), got.view(np.uint8)):
                    failures.append(f"{case}: allocate()d buffer gave different bits on rank {rank}")
            mean = x.copy()
            collectives.allreduce(comm, mean, algorithm="ring", op="mean")
            if not np.allclose(mean, reference / size, rtol=10 * eps, atol=10 * eps):
                failures.append(f"ring mean n={n}: wrong on rank {rank}")

# reduce_scatter + allgather round trip (what a sharded optimizer does)
x = np.random.default_rng(rank).normal(size=1003)
reference = x.copy()
comm.Allreduce(MPI.IN_PLACE, reference, op=MPI.SUM)
lo, hi = collectives.reduce_scatter(comm, x)
if not np.allclose(x[lo:hi], reference[lo:hi], rtol=1e-12):
    failures.append(f"reduce_scatter: wrong segment on rank {rank}")
collectives.allgather(comm, x)
if not np.allclose(x, reference, rtol=1e-12) or not agreed_crc(x):
    failures.append(f"reduce_scatter+allgather: wrong or not identical on rank {rank}")

counts = np.array([len(failures)], np.int64)
comm.Allreduce(MPI.IN_PLACE, counts, op=MPI.SUM)
for line in failures[:20]:
    print(f"FAIL {line}", flush=True)
nodes = np.array([1 if comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank() == 0 else 0], np.int64)
comm.Allreduce(MPI.IN_PLACE, nodes, op=MPI.SUM)
if rank == 0:
    print(f"checked P={size} on {nodes[0]} node(s), {', '.join(ALGORITHMS)}: {counts[0]} failure(s)",
          flush=True)
sys.exit(1 if counts[0] else 0)
