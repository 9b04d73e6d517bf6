"""Run under mpirun: the bf16-compressed ring allreduce against an independent reference.

tests/test_compression.py launches it under mpirun, always with a timeout. For several
lengths (an empty one, fewer elements than ranks, uneven segments, a long buffer) every
rank's result must be bitwise the numpy emulation of the ring's bf16 schedule
(``reference.ring_bf16_allreduce``), the same on every rank and on a second run, and within
the bf16 error bound of MPI_Allreduce's float32 sum.

Prints one line per failure on rank 0 and ``checked P=<size>: <n> failure(s)``.
"""

import sys
import zlib
from pathlib import Path

import numpy as np
from mpi4py import MPI

from failures import report as failures_report

from granger_mpi import collectives

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reference  # noqa: E402

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
failures = []

for n in (0, 1, size - 1, 1001, 300_007):
    inputs = [np.random.default_rng(100 * n + r).normal(scale=10.0 ** (r % 3), size=n).astype(np.float32)
              for r in range(size)]
    expected = reference.ring_bf16_allreduce(inputs) if n else inputs[0]
    exact = np.empty(n, np.float32)
    comm.Allreduce(inputs[rank], exact, op=MPI.SUM)
    results = []
    for _ in range(2):
        buf = inputs[rank].copy()
        collectives.allreduce(comm, buf, algorithm="ring", compression="bf16")
        results.append(buf)
    label = f"n={n}"
    if results[0].tobytes() != expected.tobytes():
        bad = np.flatnonzero(results[0].view(np.uint32) != expected.view(np.uint32))
        failures.append(f"{label} rank {rank}: {bad.size} element(s) differ from the reference, "
                        f"first {bad[:3]}")
    if results[0].tobytes() != results[1].tobytes():
        failures.append(f"{label} rank {rank}: two runs differ")
    if len(set(comm.allgather(zlib.crc32(results[0].view(np.uint8))))) != 1:
        failures.append(f"{label}: ranks hold different sums")
    # P bf16 roundings of partial sums, each a relative 2**-9 of at most sum(|x|).
    bound = size * 2.0 ** -8 * np.sum(np.abs(inputs), axis=0)
    if n and not np.all(np.abs(results[0] - exact) <= bound):
        failures.append(f"{label}: off MPI_Allreduce by more than the bf16 bound")

buf = np.ones(8, np.float64)
try:
    collectives.allreduce(comm, buf, algorithm="ring", compression="bf16")
    failures.append("a float64 buffer was accepted")
except ValueError:
    pass

failures_report(comm, failures)
