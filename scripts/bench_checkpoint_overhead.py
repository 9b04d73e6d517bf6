"""Training time with and without a checkpoint every 100 steps, side by side.

A 784-256-10 MLP (about 1.6 MiB of parameters and momentum) on 30,000 generated rows, 2
ranks, 10 epochs (1,180 steps, 11 checkpoints); no checkpoints, a checkpoint every 100
steps, and the same written in the background (``[checkpoint].async_write``) alternate 5
times (``GRANGER_BENCH_REPS``, each rep in another order). We compare median times of the
training loop as the job reports it ("done: N steps in X s", start-up and the final
evaluation left out), and the ratio within each rep. Identical runs differ by tens of
percent on a shared machine, so the script also reads what the loop itself spent in its
saves, from each run's per-rank time split (``metrics.h5``, ``ranks/checkpoint_s``): ms per
save, and their sum as a share of the loop's time in that run. It takes the rank that
spent least: a rank that reaches the save first also counts, inside it, its wait for the
others (rank 0's metrics and progress line), which it would otherwise spend in the next
allreduce (``wait_s`` uses the same rule)."""

import os
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
REPS = int(os.environ.get("GRANGER_BENCH_REPS", "5"))
MPIRUN = [str(ROOT / "scripts" / "mpirun"), "-n", "2", str(ROOT / ".venv" / "bin" / "granger-mpi")]

JOB = """
[data]
path = "{data}"
[model]
kind = "mlp"
hidden = [256]
[optimizer]
learning_rate = 0.05
momentum = 0.9
[train]
global_batch = 256
epochs = 10
seed = 1
[output]
run_dir = "{run}"
progress_interval_s = 1000.0
[checkpoint]
at_end = false
{every}
"""


def main():
    with tempfile.TemporaryDirectory(dir=ROOT / "runs" if (ROOT / "runs").is_dir() else None) as tmp:
        tmp = Path(tmp)
        data = tmp / "train.h5"
        subprocess.run([*MPIRUN, "make-dataset", str(data), "--rows", "30000", "--features", "784",
                        "--classes", "10", "--seed", "3"], check=True, capture_output=True)
        variants = (("none", ""), ("every 100 steps", "every_steps = 100"),
                    ("every 100, async", "every_steps = 100\nasync_write = true"))
        seconds = {label: [] for label, _ in variants}
        split = {label: [] for label, _ in variants[1:]}   # (ms per save, share of the loop)
        for rep in range(REPS):
            # Each rep starts with another variant, so that drift and order effects spread
            # over all of them instead of always favouring the first.
            for k in [(rep + j) % len(variants) for j in range(len(variants))]:
                label, every = variants[k]
                job = tmp / f"{rep}-{k}.toml"
                job.write_text(JOB.format(data=data, run=tmp / f"run-{rep}-{k}", every=every))
                out = subprocess.run([*MPIRUN, "train", str(job)], check=True, capture_output=True,
                                     text=True).stdout
                seconds[label].append(float(re.search(r"done: \d+ steps in ([0-9.]+) s", out).group(1)))
                if every:
                    saves = len(re.findall(r"^checkpoint .*\(step \d+", out, re.M))
                    with h5py.File(tmp / f"run-{rep}-{k}" / "metrics.h5", "r") as f:
                        spent = float(np.nansum(f["ranks/checkpoint_s"][...], axis=0).min())
                    split[label].append((1e3 * spent / saves, spent / seconds[label][-1]))
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
            ms, share = (statistics.median(v) for v in zip(*values))
            print(f"  time split, {label}: {ms:.1f} ms per save, {share:.1%} of the loop (medians); "
                  f"per rep: {', '.join(f'{100 * v:.1f}%' for _, v in values)}")


if __name__ == "__main__":
    main()
