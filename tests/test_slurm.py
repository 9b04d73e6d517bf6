"""jobs/train.sbatch on a real one-node Slurm (scripts/local-slurm), started for this session.

Every wait has a timeout; a test that fails prints the job's output file and the tails of
the slurmctld and slurmd logs. The jobs run 2 ranks of a small MLP through scripts/mpirun.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, THROTTLE, ULFM_FLAGS, _env, granger, mpirun, read_params, write_job
from test_checkpoint import bits

SBATCH_SCRIPT = ROOT / "jobs" / "train.sbatch"
LOCAL_SLURM = ROOT / "scripts" / "local-slurm"


def _free_port_pair():
    """A port P such that P and P+1 are free now (slurmctld, slurmd)."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port > 65000:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports found")


class Slurm:
    """The session's cluster: its environment, and helpers that wait with timeouts."""

    def __init__(self, state_dir, port):
        self.state_dir = state_dir
        self.conf = state_dir / "slurm.conf"
        self.env = {"GRANGER_SLURM_DIR": str(state_dir), "GRANGER_SLURM_PORT": str(port),
                    "SLURM_CONF": str(self.conf)}

    def command(self, *args, timeout=30, check=True):
        """Run a Slurm client command; its stdout."""
        done = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                              env=_env(self.env), timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"$ {' '.join(map(str, args))} exited {done.returncode}:\n"
                                 f"{done.stdout}{done.stderr}\n{self.logs()}")
        return done.stdout

    def sbatch(self, *args, cwd, env=None):
        """Submit jobs/train.sbatch (``args``: sbatch options, the script, its arguments)."""
        extra = {"GRANGER_RUNS": str(cwd / "runs"), "GRANGER_MPIRUN": str(ROOT / "scripts" / "mpirun"),
                 **(env or {})}
        done = subprocess.run(["sbatch", "--parsable", *map(str, args)], capture_output=True, text=True,
                              env=_env({**self.env, **extra}), cwd=cwd, timeout=30)
        assert done.returncode == 0, f"sbatch failed:\n{done.stdout}{done.stderr}\n{self.logs()}"
        return done.stdout.strip().split(";")[0]

    def job(self, job_id):
        """``scontrol show job`` as a dict (finished jobs stay for MinJobAge = 1 h)."""
        text = self.command("scontrol", "-o", "show", "job", job_id)
        return dict(re.findall(r"(\w+(?:/\w+)?)=(\S*)", text))

    def logs(self, lines=40):
        """The tails of the daemons' logs, for failure messages."""
        out = []
        for name in ("slurmctld", "slurmd"):
            path = self.state_dir / "log" / f"{name}.log"
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(none)"]
            out.append(f"--- {path} (last {lines} lines) ---\n" + "\n".join(text))
        return "\n".join(out)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A one-node Slurm for this session (its own state directory and ports); stopped after."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm needs root (scripts/local-slurm installs packages and runs slurmd)")
    cluster = Slurm(tmp_path_factory.mktemp("slurm"), _free_port_pair())
    started = subprocess.run([str(LOCAL_SLURM), "start"], capture_output=True, text=True,
                             env=_env(cluster.env), timeout=900)
    try:
        if started.returncode != 0:
            if shutil.which("slurmctld") is None or shutil.which("munged") is None:
                pytest.skip(f"Slurm could not be installed here:\n{started.stdout}{started.stderr}")
            pytest.fail(f"scripts/local-slurm start failed:\n{started.stdout}{started.stderr}\n"
                        f"{cluster.logs()}")
        again = subprocess.run([str(LOCAL_SLURM), "start"], capture_output=True, text=True,
                               env=_env(cluster.env), timeout=60)       # idempotent
        assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
        yield cluster
    finally:
        stopped = subprocess.run([str(LOCAL_SLURM), "stop"], capture_output=True, text=True,
                                 env=_env(cluster.env), timeout=120)
        print(stopped.stdout, stopped.stderr)


def wait_until(predicate, timeout, what, interval=0.25):
    """Poll ``predicate`` until it returns something true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def text_of(path):
    return path.read_text(errors="replace") if path.exists() else ""


def lines_after(path, marker, prefix):
    """Lines of ``path`` starting with ``prefix`` that come after the first line containing ``marker``."""
    lines = text_of(path).splitlines()
    for i, line in enumerate(lines):
        if marker in line:
            return [rest for rest in lines[i + 1:] if rest.startswith(prefix)]
    return []


def finished(slurm, job_id):
    """The job's record once it has ended for good (not pending, running or requeueing)."""
    info = slurm.job(job_id)
    return info if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                            "NODE_FAIL", "OUT_OF_MEMORY") else None


@contextmanager
def reported(slurm, output_of):
    """On any failure inside, print the job's output file and the daemons' logs, then cancel it."""
    jobs = []
    try:
        yield jobs
    except BaseException:
        for job_id in jobs:
            path = output_of(job_id)
            print(f"--- job {job_id}: {path} ---\n{text_of(path)}")
            print(slurm.command("scontrol", "show", "job", job_id, check=False))
        print(slurm.logs())
        raise
    finally:
        for job_id in jobs:
            slurm.command("scancel", job_id, check=False)


def seconds(duration):
    """Seconds in a Slurm duration: ``[D-]HH:MM:SS`` or ``MM:SS``."""
    days, _, clock = duration.rpartition("-")
    total = 0
    for part in clock.split(":"):
        total = total * 60 + int(part)
    return total + int(days or 0) * 86400


def rank_pids(run_dir):
    """The training ranks of the run in ``run_dir`` (not mpirun, whose command line is alike)."""
    found = subprocess.run(["pgrep", "-f", f"^[^ ]*python[^ ]* [^ ]*granger-mpi train .*--run-dir {run_dir}( |$)"],
                           capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in found]


# Rank 1 stalls at step 3 and at step 1,000, so that every signal a test sends reaches a run
# still training, however fast the machine (all 6,400 steps took 1.8 s on one): the first
# signal follows the first progress line (step 1); before freezing or cancelling the ranks a
# test waits for the second stall's "inject:" line (STALLED).
HOLDS = (*THROTTLE, "--inject-failure", "rank=1,step=3,mode=slow,seconds=5",
         "--inject-failure", "rank=1,step=1000,mode=slow,seconds=10")
STALLED = "inject: rank 1 slow at step 1000"


@pytest.fixture(scope="module")
def job(small_dataset, tmp_path_factory):
    """A job of 6,400 steps at P = 2 (seconds of training), run by the tests below."""
    base = tmp_path_factory.mktemp("slurm-jobs")
    return write_job(base / "long.toml", dataset=small_dataset, run_dir=base / "direct",
                     train={"epochs": 200}, collectives={"algorithm": "ring"},
                     output={"progress_interval_s": 0.2})


@pytest.fixture(scope="module")
def direct(job):
    """The reference: the same job run directly with mpirun at P = 2, in the background
    while the Slurm jobs run; call ``direct()`` for its final parameters."""
    pool = ThreadPoolExecutor(1)
    future = pool.submit(mpirun, 2, "train", job, *THROTTLE, timeout=300)

    def params():
        run = future.result()
        assert run.returncode == 0, run.output
        return read_params(Path(job).parent / "direct" / "model.h5")
    yield params
    pool.shutdown(wait=True)


def test_time_limit_checkpoints_requeues_resumes_and_ends_bitwise_identical(slurm, job, direct, tmp_path):
    """Slurm's time-limit warning (USR1 to the batch shell) makes the job checkpoint, requeue
    itself and resume; the final parameters equal a direct ``mpirun`` run's, bit for bit.
    A ``scancel --batch --signal=USR1`` on the way makes a checkpoint and training goes on.

    The ranks are frozen (SIGSTOP) while the test waits for Slurm's warning, which comes from
    slurmctld's 30-second time-limit check: a stand-in for a long training step, so the job
    need not run for minutes.
    """
    name = "timelimit"
    out = tmp_path / f"{name}.out"
    run_dir = tmp_path / "runs" / name
    with reported(slurm, lambda _: out) as jobs:
        job_id = slurm.sbatch("-J", name, "-n", "2", "--time=10", "--signal=B:USR1@120",
                              "-o", out, SBATCH_SCRIPT, job, *HOLDS, cwd=tmp_path)
        jobs.append(job_id)
        wait_until(lambda: "\nstep " in text_of(out), 120, "the first progress line")

        # USR1 to the batch shell, far from the time limit: a checkpoint, training goes on.
        slurm.command("scancel", "--batch", "--signal=USR1", job_id)
        saved = wait_until(lambda: [line for line in lines_after(out, "USR1: asking every rank", "checkpoint ")],
                           60, "the checkpoint asked for with USR1")[0]
        wait_until(lambda: lines_after(out, saved, STALLED), 60, "training to go on after the checkpoint")
        assert slurm.job(job_id)["JobState"] == "RUNNING"

        # Freeze the ranks, and bring the time limit within two minutes: Slurm's warning follows.
        ranks = rank_pids(run_dir)
        assert len(ranks) == 2, f"training ended too early to be interrupted: ranks {ranks}\n{text_of(out)}"
        for pid in ranks:
            os.kill(pid, signal.SIGSTOP)
        try:
            assert granger("inspect", saved.split()[1], "--verify").returncode == 0
            # Limit (whole minutes) such that 60-120 s remain: the warning (lead 120 s) comes at
            # slurmctld's next 30-second check, with at least 30 s left for the checkpoint.
            minutes = -(-(seconds(slurm.job(job_id)["RunTime"]) + 60) // 60)
            slurm.command("scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}")
            wait_until(lambda: "left before the time limit: checkpoint, stop, requeue" in text_of(out),
                       90, "Slurm's time-limit signal (USR1 to the batch shell)")
            # The requeued run gets the full limit back (a real job would have it anyway).
            slurm.command("scontrol", "update", f"JobId={job_id}", "TimeLimit=10")
        finally:
            for pid in ranks:
                os.kill(pid, signal.SIGCONT)

        info = wait_until(lambda: finished(slurm, job_id), 240, f"job {job_id} to finish after its requeue")
        text = text_of(out)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
        assert info["Restarts"] == "1", info
        assert "stopped on request after step" in text and "requeueing job" in text
        assert "requeued (restart 1): resuming" in text and "resuming from" in text
        assert "train.sbatch: done" in text

        slurm_params = read_params(run_dir / "model.h5")
        assert np.array_equal(bits(slurm_params), bits(direct()))
        import h5py
        with h5py.File(run_dir / "metrics.h5", "r") as f:   # every step once across the requeue
            assert np.array_equal(f["step"][...], np.arange(6400))
        assert not (run_dir / "STOP").exists()
        print(f"bitwise identical: {slurm_params.size} parameters of {run_dir / 'model.h5'} and the "
              f"direct mpirun run's")


@pytest.mark.parametrize("how", ["batch-term", "scancel"])
def test_term_leaves_a_good_checkpoint(slurm, job, direct, tmp_path, how):
    """``scancel --batch --signal=TERM``: the script has the ranks save and stop (exit 3),
    and the job submitted again with ``--resume auto`` ends bitwise identical to a direct
    run; a plain ``scancel`` (TERM to every process, mpirun included) still leaves the
    newest checkpoint good, whether or not the ranks managed a last one."""
    name = f"term-{how}"
    out = tmp_path / f"{name}.out"
    run_dir = tmp_path / "runs" / name
    with reported(slurm, lambda _: out) as jobs:
        job_id = slurm.sbatch("-J", name, "-n", "2", "-o", out, SBATCH_SCRIPT, job, *HOLDS, cwd=tmp_path)
        jobs.append(job_id)
        wait_until(lambda: "\nstep " in text_of(out), 120, "the first progress line")
        if how == "batch-term":
            slurm.command("scancel", "--batch", "--signal=TERM", job_id)
        else:   # a checkpoint first, so that one is there whatever the TERM does
            slurm.command("scancel", "--batch", "--signal=USR1", job_id)
            wait_until(lambda: lines_after(out, "USR1: asking every rank", "checkpoint "), 60,
                       "the checkpoint asked for with USR1")
            wait_until(lambda: STALLED in text_of(out), 60, "the second stall")
            slurm.command("scancel", job_id)
        info = wait_until(lambda: finished(slurm, job_id), 90, f"job {job_id} to end")
        wait_until(lambda: not rank_pids(run_dir), 60, "the ranks to exit")
        text = text_of(out)
        if how == "batch-term":
            assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0", info
            stopped_at = int(re.search(r"stopped on request after step (\d+)", text).group(1))
            assert (run_dir / "ckpt" / f"step_{stopped_at:08d}.h5").exists(), text
            assert "train.sbatch: stopped on request after a checkpoint" in text
            assert not (run_dir / "STOP").exists()
        else:
            assert info["JobState"] == "CANCELLED", info
            print("a last checkpoint on plain scancel:", "stopped on request after step" in text)
        assert info["Restarts"] == "0", info
        verified = granger("inspect", run_dir, "--verify")
        assert verified.returncode == 0, verified.output
        print(verified.stdout.splitlines()[0])
        if how == "batch-term":   # continue as the output file says
            assert f"sbatch -J {name} -n 2 jobs/train.sbatch {job} --resume auto" in text
            job_id = slurm.sbatch("-J", name, "-n", "2", "-o", out, SBATCH_SCRIPT, job, "--resume", "auto",
                                  cwd=tmp_path)
            jobs.append(job_id)
            info = wait_until(lambda: finished(slurm, job_id), 180, f"job {job_id} to finish")
            assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
            assert f"resuming from {run_dir}/ckpt/step_{stopped_at:08d}.h5" in text_of(out)
            assert np.array_equal(bits(read_params(run_dir / "model.h5")), bits(direct()))


def test_bad_job_file_fails_fast_and_is_not_requeued(slurm, small_dataset, tmp_path):
    bad = write_job(tmp_path / "bad.toml", dataset=small_dataset, run_dir=tmp_path / "unused",
                    optimizer={"learning_rate": -1.0})
    out = tmp_path / "bad.out"
    with reported(slurm, lambda _: out) as jobs:
        submitted = time.monotonic()
        job_id = slurm.sbatch("-J", "bad", "-n", "2", "-o", out, SBATCH_SCRIPT, bad, cwd=tmp_path)
        jobs.append(job_id)
        info = wait_until(lambda: finished(slurm, job_id), 120, f"job {job_id} to fail")
        took = time.monotonic() - submitted
        text = text_of(out)
        assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", info
        errors = [line for line in text.splitlines() if line.startswith("granger-mpi: error")]
        assert errors == ["granger-mpi: error: [optimizer].learning_rate must be > 0, got -1.0"], text
        assert "train.sbatch: bad input (see the error above): not requeued" in text
        time.sleep(3)                                       # still failed, never requeued
        info = slurm.job(job_id)
        assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info
        assert not (tmp_path / "runs" / "bad" / "ckpt").exists()
        print(f"bad job file: failed in {took:.1f} s with exit code {info['ExitCode']}")

        # A job file that is not there: the script itself says so, exit 2.
        missing = tmp_path / "missing.out"
        job_id = slurm.sbatch("-J", "missing", "-o", missing, SBATCH_SCRIPT, tmp_path / "nope.toml",
                              cwd=tmp_path)
        jobs.append(job_id)
        info = wait_until(lambda: finished(slurm, job_id), 60, f"job {job_id} to fail")
        assert info["ExitCode"] == "2:0" and info["Restarts"] == "0", info
        assert f"train.sbatch: error: job file {tmp_path / 'nope.toml'} not found" in text_of(missing)


def test_a_stale_stop_file_does_not_stop_the_next_run(slurm, small_dataset, tmp_path):
    """A STOP file left by a run that died before it saw it is removed at the start, not
    taken as a request: the job completes."""
    name = "stale-stop"
    out = tmp_path / f"{name}.out"
    run_dir = tmp_path / "runs" / name
    run_dir.mkdir(parents=True)
    (run_dir / "STOP").touch()
    short = write_job(tmp_path / "short.toml", dataset=small_dataset, run_dir=tmp_path / "unused")
    with reported(slurm, lambda _: out) as jobs:
        job_id = slurm.sbatch("-J", name, "-n", "2", "-o", out, SBATCH_SCRIPT, short, cwd=tmp_path)
        jobs.append(job_id)
        info = wait_until(lambda: finished(slurm, job_id), 120, f"job {job_id} to finish")
        text = text_of(out)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, text)
        assert f"removing {run_dir / 'STOP'}, left by an earlier run" in text
        assert (run_dir / "COMPLETE").exists() and "stopped on request" not in text


def test_failure_requeues_are_counted_apart_from_time_limit_requeues(slurm, small_dataset, tmp_path):
    """squeue failing when USR1 arrives: the script takes it for the time-limit warning
    (checkpoint, stop, requeue) rather than let the limit kill the job. That requeue does
    not use up the failure budget (GRANGER_MAX_REQUEUES=1): the resumed run loses a rank
    past [fault].max_failures = 0 (exit 5) and is still requeued once, then fails for good
    when it happens again."""
    name = "budget"
    out = tmp_path / f"{name}.out"
    shim = tmp_path / "broken-squeue"
    shim.mkdir()
    (shim / "squeue").write_text("#!/bin/sh\necho 'squeue: error: slurm_load_jobs error: "
                                 "Socket timed out' >&2\nexit 1\n")
    (shim / "squeue").chmod(0o755)
    strict = write_job(tmp_path / "strict.toml", dataset=small_dataset,
                       run_dir=tmp_path / "unused", train={"epochs": 200},
                       collectives={"algorithm": "ring"}, output={"progress_interval_s": 0.2},
                       fault={"max_failures": 0, "mode": "ulfm"})
    env = {"PATH": f"{shim}:{_env()['PATH']}", "GRANGER_MAX_REQUEUES": "1",
           "GRANGER_MPIRUN_ARGS": " ".join(ULFM_FLAGS)}
    with reported(slurm, lambda _: out) as jobs:
        job_id = slurm.sbatch("-J", name, "-n", "2", "-o", out, SBATCH_SCRIPT, strict, *HOLDS,
                              "--inject-failure", "rank=1,step=500,mode=kill9", cwd=tmp_path, env=env)
        jobs.append(job_id)
        wait_until(lambda: "\nstep " in text_of(out), 120, "the first progress line")
        slurm.command("scancel", "--batch", "--signal=USR1", job_id)
        info = wait_until(lambda: finished(slurm, job_id), 240, f"job {job_id} to end")
        text = text_of(out)
        assert "squeue failed (time left unknown): taking it for the time-limit warning" in text, text
        assert "checkpoint written before the time limit: requeueing" in text
        assert "exit 5: requeued (failure requeue 1 of at most 1)" in text, text
        assert "failed: exit 5 after 1 failure requeue(s)" in text, text
        assert info["JobState"] == "FAILED" and info["Restarts"] == "2", info
