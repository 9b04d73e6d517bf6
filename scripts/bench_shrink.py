"""Allreduce on a communicator after a ULFM shrink against the same ranks' communicator
made before the failure (published work saw collectives up to 14x slower after a shrink).

One ``mpirun -n 4`` with ULFM: the allreduce (``ring``, ``rd`` and ``native``) timed on
the 4 ranks, then on ranks 0-2 through a communicator split off before any failure, then
rank 3 dies and ranks 0-2 time it again on the communicator ``MPI_Comm_shrink`` made.
Median of ``--reps`` after warm-up, per size; CSV to docs/bench/shrink.csv.

    .venv/bin/python scripts/bench_shrink.py
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_common
from bench_common import ROOT
from granger_mpi.mpi.ulfm import LAUNCH_FLAGS

PROGRAM = r'''
import os, sys, time
import numpy as np
from mpi4py import MPI
from granger_mpi import collectives

reps = int(sys.argv[1])
world = MPI.COMM_WORLD.Dup()
world.Set_errhandler(MPI.ERRORS_RETURN)
rank = world.Get_rank()
before = world.Split(0 if rank < 3 else MPI.UNDEFINED, rank)
sizes = [2**16, 2**20, 2**23]

def timed(comm, label):
    rows = []
    for nbytes in sizes:
        buf = np.ones(nbytes // 4, np.float32)
        for algorithm in ("ring", "rd", "native"):
            times = []
            for i in range(reps + 3):
                comm.Barrier()
                t = time.perf_counter()
                collectives.allreduce(comm, buf, algorithm=algorithm)
                times.append(time.perf_counter() - t)
            if comm.Get_rank() == 0:
                median = float(np.median(times[3:]))
                rows.append(f"{label},{comm.Get_size()},{algorithm},{nbytes},{median:.6f},"
                            f"{min(times[3:]):.6f},{max(times[3:]):.6f}")
    return rows

rows = timed(world, "original")
if rank < 3:
    rows += timed(before, "split before the failure")
world.Barrier()
if rank == 3:
    os._exit(1)
try:
    while True:
        world.Barrier()
except MPI.Exception:
    pass
world.Revoke()
shrunk = world.Shrink()
rows += timed(shrunk, "shrunk after the failure")
if rank == 0:
    print("\n".join(rows), flush=True)
shrunk.Barrier()
os._exit(0)
'''


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=21)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "shrink.csv")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        program = Path(tmp) / "shrink.py"
        program.write_text(PROGRAM)
        done = subprocess.run([bench_common.MPIRUN, "-n", "4", *LAUNCH_FLAGS, bench_common.PYTHON,
                               str(program), str(args.reps)], capture_output=True, text=True,
                              timeout=600)
    lines = [line for line in done.stdout.splitlines() if line.count(",") == 6]
    if not lines:
        sys.exit(f"no result (exit {done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    rows = [dict(zip(("communicator", "ranks", "algorithm", "bytes", "median_s", "min_s", "max_s"),
                     line.split(","))) for line in lines]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    bench_common.write_csv(rows, args.out)
    by = {(r["communicator"], r["algorithm"], r["bytes"]): float(r["median_s"]) for r in rows}
    print(f"{'algorithm':>9} {'bytes':>9} {'P=4 ms':>8} {'P=3 before':>11} {'P=3 shrunk':>11} {'shrunk/before':>14}")
    for (label, algorithm, nbytes), seconds in by.items():
        if label != "original":
            continue
        b = by[("split before the failure", algorithm, nbytes)]
        s = by[("shrunk after the failure", algorithm, nbytes)]
        print(f"{algorithm:>9} {nbytes:>9} {seconds * 1e3:8.3f} {b * 1e3:11.3f} {s * 1e3:11.3f} {s / b:14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
