"""Test harness: real ``mpirun`` subprocesses with hard timeouts and stack dumps on hangs."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from granger_mpi.mpi.ulfm import LAUNCH_FLAGS

ROOT = Path(__file__).resolve().parent.parent
MPIRUN = [str(ROOT / "scripts" / "mpirun")]
PYTHON = sys.executable
# How the tests start granger-mpi, as the launchers do: ``-P`` keeps the current directory off
# ``sys.path`` (granger_mpi.launch.supervise.RANK_PROGRAM).
GRANGER = [PYTHON, "-P", "-m", "granger_mpi"]
ULFM_FLAGS = list(LAUNCH_FLAGS)


@dataclass
class Run:
    """A finished command: exit code and the output of every rank."""

    cmd: list
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self):
        """stdout and stderr together, for assertion messages."""
        return f"$ {' '.join(self.cmd)}\n--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"


def _env(extra=None):
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    env["PATH"] = f"{Path(PYTHON).parent}:{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def run_command(cmd, timeout, env=None, cwd=None):
    """Run ``cmd``; on timeout ask every rank for its Python stacks, kill, and fail.

    A hang therefore fails the test with each rank's stack in the message (the CLI
    registers faulthandler on SIGUSR2; mpirun forwards the signal to the ranks).
    """
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(env), cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR2)
        time.sleep(2)
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        run = Run([str(c) for c in cmd], None, out, err)
        pytest.fail(f"timed out after {timeout} s (stacks of the ranks follow)\n{run.output}")
    return Run([str(c) for c in cmd], proc.returncode, out, err)


def mpirun(n, *args, timeout=120, mpirun_args=(), env=None, cwd=None):
    """``mpirun -n n granger-mpi ARGS`` (through ``python -P -m granger_mpi``)."""
    cmd = [*MPIRUN, "-n", str(n), *mpirun_args, *GRANGER, *args]
    return run_command(cmd, timeout, env, cwd)


def mpirun_script(n, source, *args, tmp_path, timeout=120, mpirun_args=()):
    """Run a Python program (given as source text) on ``n`` ranks."""
    script = tmp_path / f"prog_{abs(hash(source)) % 10**8}.py"
    script.write_text(textwrap.dedent(source))
    cmd = [*MPIRUN, "-n", str(n), *mpirun_args, PYTHON, "-X", "faulthandler", str(script), *args]
    return run_command(cmd, timeout)


def granger(*args, timeout=120, env=None, cwd=None):
    """``granger-mpi ARGS`` without mpirun (a singleton MPI process where MPI is needed)."""
    return run_command([*GRANGER, *args], timeout, env, cwd)


# Train's arguments for a throttle: every rank sleeps 5 ms a step, which keeps a run going
# long enough for a signal, a kill or a timer to land in the middle of it (the small test
# runs' steps take a fraction of a millisecond). It changes no number a run computes.
THROTTLE = ("--inject-failure", "rank=*,step=*,mode=slow,seconds=0.005")


@contextlib.contextmanager
def tmpfs(path, options):
    """A tmpfs mounted at the new directory ``path`` with ``options`` (``"ro"``,
    ``"size=2m"``; needs root: the test is skipped, saying why, where mount is refused)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}) here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def write_job(path, *, dataset, run_dir, **sections):
    """A job file with small defaults; ``sections`` override ``{section: {key: value}}``."""
    job = {
        "data": {"path": str(dataset)},
        "model": {"kind": "mlp", "hidden": [16]},
        "optimizer": {"learning_rate": 0.1, "momentum": 0.9},
        "train": {"global_batch": 64, "epochs": 2, "seed": 3},
        "output": {"run_dir": str(run_dir), "progress_interval_s": 0.0},
    }
    for section, values in sections.items():     # a value of None removes the key
        job.setdefault(section, {}).update(values)
        job[section] = {k: v for k, v in job[section].items() if v is not None}
    lines = []
    for section, values in job.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _toml(value):
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
    """A 2,000-row, 12-feature, 4-class dataset written by 2 ranks, with a test file."""
    path = tmp_path_factory.mktemp("data") / "small.h5"
    run = mpirun(2, "make-dataset", path, "--rows", "2000", "--test-rows", "500", "--features", "12",
                 "--classes", "4", "--separation", "1.5", "--seed", "5")
    assert run.returncode == 0, run.output
    return path


@pytest.fixture(scope="session")
def saved_run(small_dataset, tmp_path_factory):
    """A finished 2-rank run with checkpoints at steps 10 and 20 and its model file (tests
    copy what they damage)."""
    run_dir = tmp_path_factory.mktemp("saved") / "run"
    job = write_job(run_dir.with_name("job.toml"), dataset=small_dataset, run_dir=run_dir,
                    train={"max_steps": 20}, checkpoint={"every_steps": 10})
    run = mpirun(2, "train", job, timeout=120)
    assert run.returncode == 0, run.output
    return run_dir


@pytest.fixture(scope="session")
def reference_run(small_dataset, tmp_path_factory):
    """``reference_run(n)``: ``(the finished mpirun, its run dir)`` of the default small job
    (2 epochs, sync, with the test set) at P = n, trained once per session for every test
    that compares with it; tests only read its run dir. ``reference_run(n, copy=1)``: the
    same job trained once more, in a run dir of its own."""
    base = tmp_path_factory.mktemp("reference")
    done = {}

    def run(n, copy=0):
        label = f"p{n}" + (f"-copy{copy}" if copy else "")
        if label not in done:
            job = write_job(base / f"{label}.toml", dataset=small_dataset, run_dir=base / label,
                            data={"test_path": str(small_dataset.with_name("small-test.h5"))})
            finished = mpirun(n, "train", job, timeout=180)
            assert finished.returncode == 0, finished.output
            done[label] = (finished, base / label)
        return done[label]
    return run


def read_params(model_path):
    """Flat parameters of a model file, read with h5py (independent of granger-mpi)."""
    import h5py
    with h5py.File(model_path, "r") as f:
        names = sorted(f["params"], key=lambda n: (int(n[1:]), n[0] == "b"))
        return np.concatenate([f["params"][n][...].ravel() for n in names])


def blas_thread_counts(log):
    """The thread count of every BLAS library in a training log's start line."""
    found = re.search(r"thread\(s\) per rank \(BLAS: ([^)]*)\)", log)
    assert found, log
    return [int(n) for n in re.findall(r" x (\d+) threads", found.group(1))]
