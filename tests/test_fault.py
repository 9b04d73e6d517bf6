"""Rank failures under ULFM: a SIGKILLed rank, survivors revoke, shrink and carry on."""

import json
import os
import signal
import subprocess

import numpy as np

from conftest import MPIRUN, PYTHON, ULFM_FLAGS, _env, mpirun, read_params
from test_checkpoint import count_rows, job_file, wait_for_line


def rank_pid(pids, rank):
    """The process of MPI rank ``rank`` among ``pids`` (from its environment)."""
    for pid in pids:
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no rank {rank} among {pids}")


def test_survivors_finish_with_every_sample_once_per_epoch(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    log_dir = tmp_path / "rows"
    log_dir.mkdir()
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, train={"epochs": 100},
                   output={"progress_interval_s": 0.0})
    cmd = [*MPIRUN, "-n", "3", *ULFM_FLAGS, PYTHON, "-m", "granger_mpi", "train", str(job)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env({"GRANGER_ROW_LOG": str(log_dir)}), start_new_session=True)
    try:
        lines = wait_for_line(proc, "fault tolerance: ULFM", timeout=60)
        lines += wait_for_line(proc, "step 100/", timeout=60)
        pids = subprocess.run(["pgrep", "-f", f"^{PYTHON} -m granger_mpi train {job}"],
                              capture_output=True, text=True).stdout.split()
        assert len(pids) == 3, pids
        os.kill(rank_pid(pids, 2), signal.SIGKILL)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = "".join(lines) + out
    assert (run_dir / "COMPLETE").exists(), f"{out[-4000:]}\n--- stderr ---\n{err[-4000:]}"
    record = json.loads((run_dir / "COMPLETE").read_text())   # not mpirun's exit code
    assert record["ranks_lost"] == 1 and record["world_size"] == 2 and record["steps"] == 100 * 32, out[-3000:]
    assert "rank failure at step" in out and "1 rank(s) lost; 2 continue from step" in out, out[-3000:]
    print(next(line for line in out.splitlines() if line.startswith("rank failure")))
    uses = count_rows(log_dir)
    assert set(uses.values()) == {1} and len(uses) == 100 * 2000
    # The survivors' result is a real training result, close to an undisturbed run's.
    straight = mpirun(3, "train", job_file(tmp_path / "b.toml", small_dataset, tmp_path / "ref",
                                           train={"epochs": 100}), timeout=180)
    assert straight.returncode == 0, straight.output
    ours = read_params(run_dir / "model.h5").astype(np.float64)
    ref = read_params(tmp_path / "ref" / "model.h5").astype(np.float64)
    assert np.abs(ours - ref).max() / np.abs(ref).max() <= 1e-4
