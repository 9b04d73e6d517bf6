"""Training throughput of this tree against another checkout of granger-mpi, paired.

    .venv/bin/python scripts/bench_compare.py OTHER_TREE [--reps 5] [--ranks 1,2]

The same job (the suite's problem: 65,536 rows x 64 features, MLP 64-256-10, global batch
512, 3 epochs) runs alternately with each tree's code (``PYTHONPATH=OTHER_TREE`` for the
other, this tree's venv for both), each rep starting with the other side. Throughput is the
global samples of the steps after the first 3 over their step times on rank 0 (from
``metrics.h5``, as ``scripts/bench`` computes it). Prints medians, min-max and the paired
ratios; the old tree needs no summary.json.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py

import bench_common
from bench_common import GRANGER, MPIRUN

WARMUP_STEPS = 3


def throughput(run_dir):
    with h5py.File(Path(run_dir) / "metrics.h5", "r") as f:
        seconds = f["step_time_s"][WARMUP_STEPS:]
        samples = f["samples_per_s"][WARMUP_STEPS:] * seconds
    return float(samples.sum() / seconds.sum())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="another checkout of granger-mpi (its root)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--ranks", default="1,2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="granger-compare-") as tmp:
        tmp = Path(tmp)
        data = bench_common.make_dataset(tmp / "train.h5", rows=65536, features=64, classes=10,
                                         seed=7, clusters=4, separation=0.35)
        rates = {}
        for ranks in map(int, args.ranks.split(",")):
            for rep in range(args.reps):
                for side in (("this", "other") if rep % 2 == 0 else ("other", "this")):
                    run_dir = tmp / f"{side}-{ranks}-{rep}"
                    job = bench_common.write_job(tmp / f"{side}-{ranks}-{rep}.toml", {
                        "data": {"path": str(data)}, "model": {"kind": "mlp", "hidden": [256]},
                        "optimizer": {"learning_rate": 0.05, "momentum": 0.9},
                        "train": {"global_batch": 512, "epochs": 3, "seed": 1},
                        "fault": {"mode": "restart"},
                        "output": {"run_dir": str(run_dir), "progress_interval_s": 100000.0},
                        "checkpoint": {"at_end": False}})
                    env = dict(bench_common.YIELDING, PYTHONPATH=str(args.other.resolve())
                               if side == "other" else "")
                    done = subprocess.run([MPIRUN, "-n", str(ranks), GRANGER, "train", str(job)],
                                          capture_output=True, text=True, env=env, timeout=900)
                    if done.returncode != 0:
                        sys.exit(f"{side} P={ranks}: exit {done.returncode}\n{done.stderr[-2000:]}")
                    rates.setdefault((ranks, side), []).append(throughput(run_dir))
            this, other = rates[(ranks, "this")], rates[(ranks, "other")]
            ratios = [a / b for a, b in zip(this, other)]
            for side, values in (("this", this), ("other", other)):
                print(f"P={ranks} {side:<5} samples/s median {statistics.median(values):>9,.0f} "
                      f"[{min(values):,.0f} - {max(values):,.0f}]", flush=True)
            print(f"P={ranks} this/other: median of medians {statistics.median(this) / statistics.median(other):.3f}; "
                  f"per rep {', '.join(f'{r:.3f}' for r in ratios)} (median {statistics.median(ratios):.3f}); "
                  f"load average {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
