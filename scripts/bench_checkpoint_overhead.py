"""Training time with and without a checkpoint every 100 steps, side by side.

A 784-256-10 MLP (about 1.6 MiB of parameters and momentum) on 30,000 generated rows, 2
ranks, 10 epochs (1,180 steps, 11 checkpoints); no checkpoints, a checkpoint every 100
steps, and the same written in the background (``[checkpoint].async_write``) alternate 5
times (``GRANGER_BENCH_REPS``, each rep in another order). We compare median times of the
training loop as the run reports it (``train_seconds`` in ``RUN_DIR/summary.json``: start-up
and the final evaluation left out), and the ratio within each rep. Identical runs differ by tens of
percent on a shared machine, so the script also reads what the loop itself spent in its
saves, from each run's per-rank time split (``metrics.h5``, ``ranks/checkpoint_s``): ms per
save, and their sum as a share of the loop's time in that run. It takes the rank that
spent least: a rank that reaches the save first also counts, inside it, its wait for the
others (rank 0's metrics and progress line), which it would otherwise spend in the next
allreduce (``wait_s`` uses the same rule).

A save may also slow the steps after it (cold caches, the file system still busy), which
the time split does not see. From each run's own step times (``step_time_s``), the script
sums how much the 10 steps after every 100th (``AFTER``) took over the run's median step,
per save, in every variant: the runs without checkpoints give the same steps' excess with
no save before them (a step past 5 medians counts as 5: single stalls of 100 ms happen
here in any run). Both are within-run figures, so the machine's drift between runs, which
moves the wall-clock by ±15%, does not enter them."""

import os
import re
import statistics
import tempfile
from pathlib import Path

import h5py
import numpy as np

import bench_common
from bench_common import ROOT

AFTER = 10     # the steps after a save whose excess over the run's median step is counted
REPS = int(os.environ.get("GRANGER_BENCH_REPS", "5"))


def job(path, data, run_dir, checkpoint):
    return bench_common.write_job(path, {
        "data": {"path": str(data)}, "model": {"kind": "mlp", "hidden": [256]},
        "optimizer": {"learning_rate": 0.05, "momentum": 0.9},
        "train": {"global_batch": 256, "epochs": 10, "seed": 1},
        "output": {"run_dir": str(run_dir), "progress_interval_s": 1000.0},
        "checkpoint": {"at_end": False, **checkpoint}})


def main():
    with tempfile.TemporaryDirectory(dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None) as tmp:
        tmp = Path(tmp)
        data = tmp / "train.h5"
        bench_common.make_dataset(data, rows=30000, features=784, classes=10, seed=3)
        variants = (("none", {}), ("every 100 steps", {"every_steps": 100}),
                    ("every 100, async", {"every_steps": 100, "async_write": True}))
        seconds = {label: [] for label, _ in variants}
        split = {label: [] for label, _ in variants[1:]}   # (ms per save, share of the loop, saves)
        after = {label: [] for label, _ in variants}       # ms over the median, per save
        for rep in range(REPS):
            # Each rep starts with another variant, so that drift and order effects spread
            # over all of them instead of always favouring the first.
            for k in [(rep + j) % len(variants) for j in range(len(variants))]:
                label, every = variants[k]
                run_dir = tmp / f"run-{rep}-{k}"
                run = bench_common.train(job(tmp / f"{rep}-{k}.toml", data, run_dir, every), 2,
                                         run_dir=run_dir)
                out = run.output
                seconds[label].append(run.summary["train_seconds"])
                after[label].append(excess_after_saves(tmp / f"run-{rep}-{k}" / "metrics.h5"))
                if every:
                    saves = len(re.findall(r"^checkpoint .*\(step \d+", out, re.M))
                    with h5py.File(tmp / f"run-{rep}-{k}" / "metrics.h5", "r") as f:
                        spent = float(np.nansum(f["ranks/checkpoint_s"][...], axis=0).min())
                    split[label].append((1e3 * spent / saves, spent / seconds[label][-1], saves))
        base = statistics.median(seconds["none"])
        print(f"training overhead of checkpointing (P = 2, 784-256-10 MLP, 1,180 steps, {REPS} reps)")
        for label, values in seconds.items():
            print(f"  {label:<17} median {statistics.median(values):.2f} s  (runs: "
                  f"{', '.join(f'{v:.2f}' for v in values)})")
        for label, _ in variants[1:]:
            pairs = [100 * (c / n - 1) for n, c in zip(seconds["none"], seconds[label])]
            print(f"  overhead, {label}: {100 * (statistics.median(seconds[label]) / base - 1):+.1f}% "
                  f"(medians); per rep: {', '.join(f'{v:+.1f}%' for v in pairs)}")
        for label, values in split.items():
            ms, share, _ = (statistics.median(v) for v in zip(*values))
            print(f"  time split, {label}: {ms:.1f} ms per save, {share:.1%} of the loop (medians); "
                  f"per rep: {', '.join(f'{100 * v:.1f}%' for _, v, _ in values)}")
        for label, values in after.items():
            print(f"  {AFTER} steps after each 100th, {label}: {statistics.median(values):+.2f} ms over "
                  f"the run's median step (median); per rep: {', '.join(f'{v:+.2f}' for v in values)}")
        # the saves' share plus what the steps after them lost, over the same steps with no save
        for label, values in split.items():
            total = [share + saves * (mine - none) / 1e3 / loop for (_, share, saves), mine, none, loop
                     in zip(values, after[label], after["none"], seconds[label])]
            print(f"  in and after the saves, {label}: {statistics.median(total):.1%} of the loop "
                  f"(median); per rep: {', '.join(f'{100 * v:.1f}%' for v in total)}")


def excess_after_saves(metrics):
    """ms that the ``AFTER`` steps after every 100th took over the run's median step,
    summed and divided by the number of such windows (a step counted as at most 5 medians)."""
    with h5py.File(metrics, "r") as f:
        steps, times = f["step"][...], 1e3 * f["step_time_s"][...]
    median = float(np.median(times))
    window = (steps >= 100) & (steps % 100 < AFTER)
    windows = len(set((steps[window] // 100).tolist()))
    return float(np.sum(np.minimum(times[window], 5 * median) - median)) / max(windows, 1)


if __name__ == "__main__":
    main()
