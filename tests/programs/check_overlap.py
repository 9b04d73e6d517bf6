"""Run under mpirun: the bucketed allreduce, overlapped and not, against MPI_Allreduce.

tests/test_overlap.py launches it under mpirun, always with a timeout. For every
algorithm, a buffer is summed in buckets twice: with the exchange thread (``ready`` called
part by part, with computation between, as backward does) and after the fact. The two must
be bitwise equal, equal on every rank, and close to MPI_Allreduce's sum. Then a bucket that
fails on one rank must raise in that rank's ``wait`` and leave the thread usable.

Prints one line per failure on rank 0 and ``checked P=<size>: <n> failure(s)``.
"""

import time
import zlib

import numpy as np
from mpi4py import MPI

from failures import report as failures_report

from granger_mpi.collectives import overlap

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()
BOUNDARIES = [9000, 4000, 1200, 0]        # where "backward" finishes a part, descending
LENGTH = 9005
failures = []


def crc(buf):
    return zlib.crc32(buf.view(np.uint8))


def agreed(value):
    values = comm.allgather(value)
    return len(set(values)) == 1


def busy(seconds):
    """Hold the GIL-free CPU like a kernel would (numpy releases the GIL in the product)."""
    a = np.ones((200, 200), np.float32)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a


data = np.random.default_rng(rank).normal(size=LENGTH).astype(np.float32)
expected = np.empty_like(data)
comm.Allreduce(data, expected, op=MPI.SUM)
for algorithm in ("native", "ring", "rhd", "rd", "shm", "hierarchical"):
    for cap in (700, 3000, 10**6):
        buckets = overlap.plan(BOUNDARIES, LENGTH, cap)
        results = {}
        for overlapped in (True, False):
            buf = data.copy()
            summer = overlap.BucketedAllreduce(comm, buf, buckets, [algorithm] * len(buckets),
                                               overlap=overlapped)
            for _ in range(2):             # two steps: the thread is reused
                buf[:] = np.nan          # "backward" writes each part just before ready
                top = LENGTH
                for offset in BOUNDARIES:
                    busy(0.002)
                    buf[offset:top] = data[offset:top]
                    top = offset
                    summer.ready(offset)
                summer.wait()
            spans = summer.take_spans()
            summer.close()
            results[overlapped] = buf
            if sorted((lo, hi) for lo, hi, _, _ in spans) != sorted(buckets * 2):
                failures.append(f"{algorithm} cap {cap} overlap {overlapped}: spans {spans[:3]}...")
        label = f"{algorithm} cap {cap} ({len(buckets)} buckets)"
        if results[True].tobytes() != results[False].tobytes():
            failures.append(f"{label}: overlapped and after-the-fact sums differ")
        if not agreed(crc(results[True])):
            failures.append(f"{label}: ranks hold different sums")
        if not np.allclose(results[True], expected, rtol=1e-5, atol=1e-5):
            failures.append(f"{label}: differs from MPI_Allreduce by "
                            f"{np.abs(results[True] - expected).max()}")

# A bucket that fails (an unknown algorithm): wait raises it, and the thread takes the next
# step normally.
buckets = overlap.plan(BOUNDARIES, LENGTH, 3000)
summer = overlap.BucketedAllreduce(comm, data.copy(), buckets, ["ring"] * (len(buckets) - 1) + ["nonesuch"])
try:
    summer.wait()
    failures.append(f"rank {rank}: a failing bucket raised nothing")
except ValueError as exc:
    if "nonesuch" not in str(exc):
        failures.append(f"rank {rank}: a failing bucket raised {exc!r}")
summer.algorithms[-1] = "ring"
summer.buf[:] = data
summer.wait()
summer.close()
if not np.allclose(summer.buf, expected, rtol=1e-5, atol=1e-5):
    failures.append(f"rank {rank}: the step after a failed bucket is wrong")

failures_report(comm, failures)
