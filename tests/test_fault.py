"""Rank failures: ULFM (revoke, shrink, carry on), the [fault] limits, the hang watchdog.

Ranks really die here (SIGKILL from outside by pid, or ``--inject-failure`` inside a step,
an allreduce or a checkpoint write), and every sample of every epoch is counted from the
row logs the ranks write as they go.
"""

import json
import os
import re
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from conftest import (GRANGER, MPIRUN, THROTTLE, PYTHON, ULFM_FLAGS, _env, granger, mpirun,
                      read_params)
from test_checkpoint import count_rows, job_file, wait_for_line

STEPS_PER_EPOCH = 32     # small_dataset: 2,000 rows, global batch 64


def rank_pid(pids, rank):
    """The process of MPI rank ``rank`` among ``pids`` (from its environment)."""
    for pid in pids:
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no rank {rank} among {pids}")


def ulfm_train(n, job, *injections, tmp_path, timeout=120, extra=(), env=None):
    """``mpirun`` with ULFM on ``n`` ranks, rows logged; returns (Run, row log folder)."""
    log_dir = tmp_path / f"rows-{job.stem}"
    log_dir.mkdir()
    args = [a for spec in injections for a in ("--inject-failure", spec)]
    run = mpirun(n, "train", job, *args, *extra, "--row-log", log_dir, mpirun_args=ULFM_FLAGS,
                 timeout=timeout, env=env)
    return run, log_dir


def assert_every_sample_once(log_dir, epochs, rows=2000):
    uses = count_rows(log_dir)
    assert set(uses.values()) == {1}, f"rows used twice: {[k for k, v in uses.items() if v > 1][:5]}"
    assert len(uses) == epochs * rows


def completion(run_dir, run):
    assert (run_dir / "COMPLETE").exists(), run.output[-6000:]
    return json.loads((run_dir / "COMPLETE").read_text())   # not mpirun's exit code


def test_p4_rank_killed_from_outside_finishes_on_3_and_matches_an_undisturbed_run(
        small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    log_dir = tmp_path / "rows"
    log_dir.mkdir()
    epochs = 100
    test_set = small_dataset.with_name("small-test.h5")
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, train={"epochs": epochs},
                   data={"test_path": str(test_set)},
                   collectives={"algorithm": "auto"})
    cmd = [*MPIRUN, "-n", "4", *ULFM_FLAGS, *GRANGER, "train", str(job), "--row-log", str(log_dir),
           *THROTTLE]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), start_new_session=True)
    try:
        lines = wait_for_line(proc, "fault tolerance: ULFM", timeout=60)
        lines += wait_for_line(proc, "step 300/", timeout=60)
        pids = subprocess.run(["pgrep", "-f", f"^{PYTHON} -P -m granger_mpi train {job}"],
                              capture_output=True, text=True).stdout.split()
        assert len(pids) == 4, pids
        os.kill(rank_pid(pids, 2), signal.SIGKILL)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines) + out
    record = json.loads((run_dir / "COMPLETE").read_text()) if (run_dir / "COMPLETE").exists() else None
    assert record, f"{out[-4000:]}\n--- stderr ---\n{err[-4000:]}"
    assert record["ranks_lost"] == 1 and record["world_size"] == 3 and record["lost_world_ranks"] == [2]
    assert record["steps"] == epochs * STEPS_PER_EPOCH
    failure = next(line for line in out.splitlines() if line.startswith("rank failure"))
    assert "1 rank(s) lost (world ranks [2]); 3 continue from step" in failure, out[-3000:]
    print(failure)
    assert_every_sample_once(log_dir, epochs)
    # The recovery is recorded with its durations, and the dead rank's status says FAILED.
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        events = f["events"]
        assert events["world_size"][:].tolist() == [3] and events["ranks_lost"][:].tolist() == [1]
        assert 0 < events["first_step_s"][0] < 30
        assert np.all(np.diff(f["step"][:]) == 1) and f["step"][-1] == epochs * STEPS_PER_EPOCH - 1
    status = granger("status", run_dir)
    assert status.returncode == 1, status.output            # nothing running any more
    states = {int(line.split()[0]): line.split()[3] for line in status.stdout.splitlines()[2:]}
    assert states == {0: "IDLE", 1: "IDLE", 2: "FAILED", 3: "IDLE"}, status.stdout
    # A real training result: test accuracy within 1 point of an undisturbed run at P = 4.
    straight = mpirun(4, "train", job_file(tmp_path / "b.toml", small_dataset, tmp_path / "ref",
                                           train={"epochs": epochs},
                                           data={"test_path": str(test_set)}), timeout=180)
    assert straight.returncode == 0, straight.output
    accuracy = [float(re.search(r"test set .*accuracy ([\d.]+)%", text).group(1))
                for text in (out, straight.stdout)]
    print(f"test accuracy: {accuracy[0]:.2f}% after the failure, {accuracy[1]:.2f}% undisturbed")
    assert abs(accuracy[0] - accuracy[1]) <= 1.0
    ours = read_params(run_dir / "model.h5").astype(np.float64)
    ref = read_params(tmp_path / "ref" / "model.h5").astype(np.float64)
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-3


def test_two_failures_at_different_steps_finish_on_2(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, train={"epochs": 5},
                   collectives={"algorithm": "rhd"})
    run, log_dir = ulfm_train(4, job, "rank=1,step=40,mode=kill9,at=allreduce",
                              "rank=3,step=90,mode=exit", tmp_path=tmp_path)
    record = completion(run_dir, run)
    assert record["world_size"] == 2 and record["lost_world_ranks"] == [1, 3], record
    assert record["steps"] == 5 * STEPS_PER_EPOCH
    assert run.stdout.count("rank failure at step") == 2, run.stdout
    assert "3 continue from step 40" in run.stdout and "2 continue from step 90" in run.stdout
    assert_every_sample_once(log_dir, 5)


def test_failures_past_max_failures_leave_a_checkpoint_and_exit_5(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, train={"epochs": 5},
                   fault={"max_failures": 1})
    run, _ = ulfm_train(4, job, "rank=1,step=40", "rank=2,step=90", tmp_path=tmp_path)
    assert run.returncode == 5, run.output
    assert "stopping (exit code 5): 2 rank(s) lost in all, [fault].max_failures is 1" in run.stdout
    assert not (run_dir / "COMPLETE").exists()
    checkpoint = run_dir / "ckpt" / "step_00000090.h5"
    verify = granger("inspect", checkpoint, "--verify")
    assert verify.returncode == 0, verify.output
    # The restart path takes it from there, here at P = 2 without ULFM.
    resumed = mpirun(2, "train", job, "--resume", "auto")
    assert resumed.returncode == 0, resumed.output
    assert "resuming from" in resumed.stdout and "step 90" in resumed.stdout


@pytest.mark.parametrize("algorithm, ranks, victim", [("ring", 4, 2), ("rhd", 3, 1), ("rd", 4, 0),
                                                      ("native", 4, 3)])
def test_a_rank_killed_inside_the_allreduce(small_dataset, tmp_path, algorithm, ranks, victim):
    """Mid-collective: the victim dies after its first point-to-point exchange (native: just
    before it enters MPI_Allreduce); rank 0 is among the victims, and rhd at P = 3 folds."""
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, collectives={"algorithm": algorithm})
    run, log_dir = ulfm_train(ranks, job, f"rank={victim},step=50,at=allreduce", tmp_path=tmp_path)
    record = completion(run_dir, run)
    assert record["world_size"] == ranks - 1 and record["lost_world_ranks"] == [victim]
    assert f"during the allreduce ({algorithm})" in run.stdout, run.stdout
    assert_every_sample_once(log_dir, 3)


def test_a_rank_killed_before_the_timing_report_only_rank_0_sees_it_there(small_dataset, tmp_path):
    """Rank 2 dies just before the per-rank timing Gather after step 29: the root fails in
    the Gather, ranks 1 and 3 (their sends done) in the next allreduce; all must meet again
    (CI once hung here when the root re-ran the Gather while the others went on). They
    agree on the earlier place, the report of step 29, and all three make it again."""
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, output={"timing_every_steps": 10},
                   fault={"step_timeout_s": 30.0})
    run, log_dir = ulfm_train(4, job, "rank=2,step=29,at=report", tmp_path=tmp_path)
    record = completion(run_dir, run)
    assert record["world_size"] == 3 and record["lost_world_ranks"] == [2], record
    assert "during a timing report" in run.stdout and "3 continue from step 30" in run.stdout
    assert_every_sample_once(log_dir, 3)
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        steps, comm_s = f["ranks/step"][...], f["ranks/comm_s"][...]
    assert steps.tolist() == [9, 19, 29, 39, 49, 59, 69, 79, 89, 95]   # 29 made again, once
    assert not np.isnan(comm_s[:2]).any() and np.isnan(comm_s[2:, 2]).all()
    assert not np.isnan(comm_s[2:, [0, 1, 3]]).any()


def test_the_writer_killed_while_writing_a_checkpoint(small_dataset, tmp_path):
    """Under ULFM rank 0 writes checkpoints alone (see checkpoint.save): kill it mid-write."""
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir,
                   checkpoint={"every_steps": 20, "keep_last": 10})
    run, log_dir = ulfm_train(4, job, "rank=0,step=40,at=checkpoint", tmp_path=tmp_path)
    record = completion(run_dir, run)
    assert record["world_size"] == 3, record
    assert "during a checkpoint" in run.stdout and "3 continue from step 40" in run.stdout
    saved = run_dir / "ckpt" / "step_00000040.h5"    # written again by the survivors
    verify = granger("inspect", saved, "--verify")
    assert verify.returncode == 0, verify.output
    with h5py.File(saved, "r") as f:
        assert f.attrs["world_size"] == 3 and f.attrs["step"] == 40
    assert_every_sample_once(log_dir, 3)


def test_a_hung_rank_is_reported_by_the_watchdog_and_the_job_ends(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, fault={"step_timeout_s": 2.0})
    run = mpirun(3, "train", job, "--inject-failure", "rank=1,step=10,mode=hang", timeout=60)
    assert run.returncode == 6, run.output
    text = run.stdout + run.stderr
    assert "watchdog: step 10 has not finished" in text, text[-4000:]
    assert "ranks that did not arrive: rank 1 (TRAINING step 10" in text, text[-4000:]
    assert "in fail" in text            # the hung rank's own stack shows where it stopped
    record = json.loads((run_dir / "status" / "rank-00001.json").read_text())
    assert record["state"] == "FAILED" and "hang" in record["note"]


def test_limits_stop_ulfm_at_the_start_of_an_unrepairable_algorithm(small_dataset, tmp_path):
    job = job_file(tmp_path / "a.toml", small_dataset, tmp_path / "run",
                   collectives={"algorithm": "shm"}, fault={"mode": "ulfm"})
    run = mpirun(2, "train", job, mpirun_args=ULFM_FLAGS, timeout=60)
    assert run.returncode == 2, run.output
    assert "[collectives].algorithm = 'shm' uses shared-memory windows" in run.stderr


def test_run_builds_the_ulfm_command(small_dataset, tmp_path):
    job = job_file(tmp_path / "a.toml", small_dataset, tmp_path / "run")
    run = granger("run", job, "-n", "4", "--dry-run", "--detector-timeout", "2")
    assert run.returncode == 0, run.output
    command = run.stdout.split("run: ", 1)[1].split()
    assert command[0] == str(PYTHON).rsplit("/", 1)[0] + "/mpirun"   # the venv's Open MPI
    flags = " ".join(command)
    assert "--with-ft ulfm --mca pml ob1 --mca btl tcp,self" in flags
    assert "--mca mpi_ft_detector_timeout 2" in flags and "-n 4" in flags
    restart = job_file(tmp_path / "b.toml", small_dataset, tmp_path / "run", fault={"mode": "restart"})
    assert "--with-ft" not in granger("run", restart, "-n", "2", "--dry-run").stdout


def test_a_silent_rank_is_declared_dead_by_the_heartbeat_detector(small_dataset, tmp_path):
    """SIGSTOP (a rank that neither works nor dies, like a node whose network went away):
    `granger-mpi run --detector-timeout 2` turns on Open MPI's heartbeat detector, which
    declares it dead after about 2 s; the others shrink and finish without it."""
    run_dir, log_dir = tmp_path / "run", tmp_path / "rows"
    log_dir.mkdir()
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, train={"epochs": 40},
                   collectives={"algorithm": "ring"})
    # Rank 2 pauses at step 302 (its heartbeat thread still beats) so that the run cannot
    # end before the SIGSTOP, however fast the machine (on one, all 1,280 steps ended first).
    cmd = [*GRANGER, "run", str(job), "-n", "4", "--detector-timeout", "2",
           "--mpirun-arg=--bind-to", "--mpirun-arg=none",
           "--inject-failure", "rank=2,step=302,mode=slow,seconds=120", "--row-log", str(log_dir),
           *THROTTLE]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(), start_new_session=True)
    stopped = None
    try:
        lines = wait_for_line(proc, "step 300/", timeout=120)
        pids = subprocess.run(["pgrep", "-f", f"^{PYTHON} -P -m granger_mpi train {job}"],
                              capture_output=True, text=True).stdout.split()
        stopped = rank_pid(pids, 2)
        os.kill(stopped, signal.SIGSTOP)
        deadline = time.time() + 150
        while not (run_dir / "COMPLETE").exists() and time.time() < deadline:
            time.sleep(0.5)
    finally:
        if stopped:
            os.kill(stopped, signal.SIGKILL)    # mpirun waits for it; the survivors are done
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
    out = "".join(lines) + out
    assert (run_dir / "COMPLETE").exists(), f"{out[-4000:]}\n--- stderr ---\n{err[-4000:]}"
    assert "--mca mpi_ft_detector true" in out
    # The launcher's own thread defaults must not reach the ranks (4 ranks share the cores).
    assert f"{max(1, len(os.sched_getaffinity(0)) // 4)} thread(s) per rank" in out, out[:3000]
    record = json.loads((run_dir / "COMPLETE").read_text())
    assert record["world_size"] == 3 and record["lost_world_ranks"] == [2], record
    assert_every_sample_once(log_dir, 40)
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        waited = float(f["events"]["detect_s"][0])
    print(f"silent rank declared dead after the survivors waited {waited:.2f} s (timeout 2 s)")
    assert 1.0 < waited < 4.0
