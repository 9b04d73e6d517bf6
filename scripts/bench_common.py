"""What the benchmark scripts share: paths, job files, datasets, training runs and what
they report (``RUN_DIR/summary.json``, never log lines), CSV files."""

import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
PYTHON = str(BIN / "python")
GRANGER = str(BIN / "granger-mpi")
MPIRUN = str(ROOT / "scripts" / "mpirun")
# Oversubscribed ranks must yield the core while they wait, or busy-polling ranks starve the
# ones with work.
YIELDING = dict(os.environ, OMPI_MCA_mpi_yield_when_idle="1")


def toml_value(value):
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


def write_job(path, sections):
    """A job file from ``{section: {key: value}}``; returns its path."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def make_dataset(path, *, rows, features, classes, seed, env=None, **options):
    """``granger-mpi make-dataset`` on 2 ranks, unless ``path`` exists; ``options`` are more
    flags (``test_rows=5000`` is ``--test-rows 5000``)."""
    path = Path(path)
    if not path.exists():
        flags = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
        subprocess.run([MPIRUN, "-n", "2", GRANGER, "make-dataset", str(path), "--rows", str(rows),
                        "--features", str(features), "--classes", str(classes), "--seed", str(seed),
                        *flags], check=True, capture_output=True, env=env)
    return path


@dataclass
class Run:
    """A finished training command: its summary.json, output and wall time."""

    summary: dict
    output: str
    wall_s: float
    returncode: int


def train(job, ranks, *, run_dir, mpirun_args=(), args=(), env=None, timeout=1800, command=None,
          lost_ranks=False):
    """``mpirun -n ranks granger-mpi train JOB ARGS`` (or ``command``); exits the script with
    the output when it fails or writes no summary. ``lost_ranks``: ranks are killed on
    purpose, so mpirun's exit code says nothing; the run must have completed."""
    cmd = command or [MPIRUN, "-n", str(ranks), *mpirun_args, GRANGER, "train", str(job), *args]
    started = time.perf_counter()
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env,
                          timeout=timeout)
    wall = time.perf_counter() - started
    summary_path = Path(run_dir) / "summary.json"
    failed = done.returncode != 0 and not lost_ranks
    if failed or not summary_path.exists() or (lost_ranks and not (Path(run_dir) / "COMPLETE").exists()):
        sys.exit(f"{' '.join(map(str, cmd))}: exit {done.returncode}\n"
                 f"{(done.stdout + done.stderr)[-3000:]}")
    return Run(json.loads(summary_path.read_text()), done.stdout + done.stderr, wall, done.returncode)


def write_csv(rows, path):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
