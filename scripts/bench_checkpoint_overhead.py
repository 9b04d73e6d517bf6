"""Training time with and without a checkpoint every 100 steps, side by side.

A 784-256-10 MLP (about 1.6 MiB of parameters and momentum) on 30,000 generated rows, 2
ranks, 10 epochs (1,180 steps, 11 checkpoints); the two variants alternate 5 times and we
compare median times of the training loop as the job reports it ("done: N steps in X s",
start-up and the final evaluation left out), and the ratio within each pair.
"""

import re
import statistics
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPS = 5
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
        seconds = {"none": [], "every 100 steps": []}
        for rep in range(REPS):
            for label, every in (("none", ""), ("every 100 steps", "every_steps = 100")):
                job = tmp / f"{rep}-{label[:4]}.toml"
                job.write_text(JOB.format(data=data, run=tmp / f"run-{rep}-{label[:4]}", every=every))
                out = subprocess.run([*MPIRUN, "train", str(job)], check=True, capture_output=True,
                                     text=True).stdout
                seconds[label].append(float(re.search(r"done: \d+ steps in ([0-9.]+) s", out).group(1)))
        base = statistics.median(seconds["none"])
        with_ckpt = statistics.median(seconds["every 100 steps"])
        print(f"training overhead of checkpointing (P = 2, 784-256-10 MLP, 1,180 steps, {REPS} reps)")
        for label, values in seconds.items():
            print(f"  {label:<16} median {statistics.median(values):.2f} s  (runs: "
                  f"{', '.join(f'{v:.2f}' for v in values)})")
        pairs = [100 * (c / n - 1) for n, c in zip(seconds["none"], seconds["every 100 steps"])]
        print(f"  overhead: {100 * (with_ckpt / base - 1):+.1f}% (medians); per pair: "
              f"{', '.join(f'{v:+.1f}%' for v in pairs)}")


if __name__ == "__main__":
    main()
