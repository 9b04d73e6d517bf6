"""Checkpoints under real mpirun: bitwise resume, re-split at another P, crashes, corruption."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from granger_mpi.data import partition
from granger_mpi.storage import manifest, seal
from granger_mpi.training.setup import row_uses as count_rows
from conftest import (GRANGER, MPIRUN, THROTTLE, PYTHON, _env, granger, mpirun, mpirun_script,
                      read_params, run_command, tmpfs, write_job)


def job_file(path, dataset, run_dir, **sections):
    sections.setdefault("train", {})
    sections["train"] = {"epochs": 3, **sections["train"]}
    return write_job(path, dataset=dataset, run_dir=run_dir, **sections)


def bits(params):
    return params.view(np.uint32)


@pytest.fixture(scope="module")
def straight(small_dataset, tmp_path_factory):
    """Uninterrupted runs at P = 1, 2, 3 (the references)."""
    base = tmp_path_factory.mktemp("straight")
    out = {}
    for ranks in (1, 2, 3):
        job = job_file(base / f"p{ranks}.toml", small_dataset, base / f"p{ranks}")
        run = mpirun(ranks, "train", job, timeout=120)
        assert run.returncode == 0, run.output
        out[ranks] = read_params(base / f"p{ranks}" / "model.h5")
    return out


def writers(path):
    """How many ranks wrote a checkpoint file."""
    with h5py.File(path, "r") as f:
        return int(f.attrs["writers"])


# A small state is written by rank 0 alone unless parallel_write_from_mib = 0: P = 3 takes
# the collective path (every rank its rows, through the mpio driver).
@pytest.mark.parametrize("ranks,parallel_from", [(1, 64), (2, 64), (3, 0)])
def test_stop_and_resume_is_bitwise_identical(straight, small_dataset, tmp_path, ranks, parallel_from):
    """Stop after 37 of 96 steps (as a time limit would), resume, finish: same bits."""
    run_dir = tmp_path / "run"
    first = mpirun(ranks, "train", job_file(tmp_path / "a.toml", small_dataset, run_dir,
                                            train={"max_steps": 37},
                                            checkpoint={"parallel_write_from_mib": parallel_from}),
                   timeout=120)
    assert first.returncode == 0, first.output
    assert writers(run_dir / "ckpt" / "step_00000037.h5") == (ranks if parallel_from == 0 else 1)
    second = mpirun(ranks, "train", job_file(tmp_path / "b.toml", small_dataset, run_dir),
                    "--resume", "auto", timeout=120)
    assert second.returncode == 0, second.output
    assert "resuming from" in second.stdout and "step 37 (epoch 1, step 5)" in second.stdout
    assert np.array_equal(bits(read_params(run_dir / "model.h5")), bits(straight[ranks]))
    with h5py.File(run_dir / "metrics.h5", "r") as f:   # no step twice, none missing
        assert np.array_equal(f["step"][...], np.arange(96))


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 5])
def test_each_rank_reads_only_its_region_and_every_row_is_used_once(small_dataset, tmp_path, ranks):
    """Row logs of a real run: each rank's rows lie in its own lanes' region of the file,
    and every row is used once per epoch, at every world size."""
    log_dir = tmp_path / "rows"
    log_dir.mkdir()
    job = job_file(tmp_path / "a.toml", small_dataset, tmp_path / "run", train={"epochs": 2})
    run = mpirun(ranks, "train", job, "--row-log", log_dir, timeout=120)
    assert run.returncode == 0, run.output
    assert f"data: rank {ranks - 1}: rows [" in run.stdout, run.stdout
    for path in log_dir.glob("rows-*.txt"):
        rank = int(path.stem.rsplit("rank", 1)[1])
        lo, hi = partition.rank_region(2000, 64, ranks, rank)
        rows = [int(r) for line in path.read_text().splitlines() for r in line.split()[3:]]
        assert rows and lo <= min(rows) and max(rows) < hi, (rank, lo, hi)
    uses = count_rows(log_dir)
    assert set(uses.values()) == {1} and len(uses) == 2 * 2000


@pytest.mark.parametrize("before,after", [(4, 3), (2, 5)])
def test_resume_at_another_world_size_uses_every_sample_once(small_dataset, tmp_path, before, after):
    run_dir = tmp_path / "run"
    log_dir = tmp_path / "rows"
    log_dir.mkdir()
    rows = ("--row-log", log_dir)
    first = mpirun(before, "train", job_file(tmp_path / "a.toml", small_dataset, run_dir,
                                             train={"max_steps": 45},
                                             checkpoint={"parallel_write_from_mib": 0}),
                   *rows, timeout=120)
    assert first.returncode == 0, first.output
    assert writers(run_dir / "ckpt" / "step_00000045.h5") == before
    second = mpirun(after, "train", job_file(tmp_path / "b.toml", small_dataset, run_dir),
                    "--resume", "auto", *rows, timeout=120)
    assert second.returncode == 0, second.output
    assert f"saved by {before} rank(s)" in second.stdout
    uses = count_rows(log_dir)
    assert set(uses.values()) == {1}                       # nothing used twice
    assert len(uses) == 3 * 2000                           # every row of every epoch once


def test_sigkill_during_a_save_falls_back_to_the_previous_checkpoint(straight, small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, checkpoint={"every_steps": 10})
    crashed = mpirun(2, "train", job, "--inject-failure", "rank=0,step=20,mode=kill9,at=checkpoint",
                     timeout=120)
    assert crashed.returncode != 0, crashed.output
    assert (run_dir / "ckpt" / "step_00000020.h5.tmp").exists()      # the torn file
    assert not (run_dir / "ckpt" / "step_00000020.h5").exists()
    resumed = mpirun(2, "train", job, "--resume", "auto", timeout=120)
    assert resumed.returncode == 0, resumed.output
    assert "resuming from" in resumed.stdout and "step_00000010.h5: step 10" in resumed.stdout
    assert np.array_equal(bits(read_params(run_dir / "model.h5")), bits(straight[2]))


def flip_bytes(path, dataset):
    with h5py.File(path, "r") as f:
        offset = f[dataset].id.get_offset()
    with open(path, "r+b") as fh:
        fh.seek(offset + 4)
        byte = fh.read(1)
        fh.seek(offset + 4)
        fh.write(bytes([byte[0] ^ 0xFF]))


def test_flipped_bytes_are_caught_by_verify_and_resume(straight, small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir,
                   train={"max_steps": 40}, checkpoint={"every_steps": 10})
    assert mpirun(2, "train", job, timeout=120).returncode == 0
    newest = run_dir / "ckpt" / "step_00000040.h5"
    unsealed = tmp_path / "unsealed.h5"       # as h5repack leaves it: the tensor is named
    unsealed.write_bytes(bytes(seal.USER_BLOCK) + newest.read_bytes()[seal.USER_BLOCK:])
    for path in (newest, unsealed):
        flip_bytes(path, "params/W1")
    verify = granger("inspect", newest, "--verify")
    assert verify.returncode == 1, verify.output
    assert f"BAD  {newest}: its bytes do not match its seal" in verify.stdout
    as_json = granger("inspect", newest, "--verify", "--json")
    assert "do not match its seal" in json.loads(as_json.stdout)["verify"][0]
    verify = granger("inspect", unsealed, "--verify")
    assert verify.returncode == 1, verify.output
    assert "BAD  /params/W1: checksum mismatch" in verify.stdout
    resumed = mpirun(2, "train", job_file(tmp_path / "b.toml", small_dataset, run_dir),
                     "--resume", "auto", timeout=120)
    assert resumed.returncode == 0, resumed.output
    assert "skipping checkpoint" in resumed.stdout and "step_00000040.h5" in resumed.stdout
    assert "step_00000030.h5: step 30" in resumed.stdout
    assert np.array_equal(bits(read_params(run_dir / "model.h5")), bits(straight[2]))


def test_resume_auto_refuses_when_no_checkpoint_verifies(small_dataset, tmp_path):
    """Torn, bit-rotted and purged checkpoints: starting again from step 0 would truncate the
    run's metrics and overwrite its model, so --resume auto refuses, naming each and why."""
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, train={"max_steps": 40},
                   checkpoint={"every_steps": 10}, output={"jsonl": True})
    assert mpirun(2, "train", job, timeout=120).returncode == 0
    ckpt = run_dir / "ckpt"
    assert sorted(p.name for p in ckpt.glob("step_*.h5")) == [
        "step_00000020.h5", "step_00000030.h5", "step_00000040.h5"]
    flip_bytes(ckpt / "step_00000040.h5", "params/W1")                     # bit rot
    torn = ckpt / "step_00000030.h5"
    torn.write_bytes(torn.read_bytes()[:2000])                             # torn
    (ckpt / "step_00000020.h5").unlink()                                   # purged
    outputs = {name: (run_dir / name).read_bytes() for name in ("model.h5", "metrics.h5", "metrics.jsonl")}
    resumed = mpirun(2, "train", job, "--resume", "auto", timeout=120)
    assert resumed.returncode == 2, resumed.output
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("granger-mpi: error")]
    assert len(errors) == 1, resumed.output
    assert "holds checkpoints but none verifies" in errors[0]
    assert "step_00000040.h5: its bytes do not match its seal" in errors[0]
    assert "step_00000030.h5: 1488 bytes after its seal" in errors[0] and "(truncated or grown)" in errors[0]
    assert "step_00000020.h5: named in latest but missing" in errors[0]
    assert "--overwrite" in errors[0]
    for name, before in outputs.items():
        assert (run_dir / name).read_bytes() == before, f"{name} was changed"


def test_a_run_that_failed_before_its_first_checkpoint_restarts_fresh(straight, small_dataset, tmp_path):
    """No checkpoint file and no index: the supervisor's --resume auto starts from step 0,
    says so, and ends as an undisturbed run."""
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, checkpoint={"every_steps": 1000})
    run = run_command([*GRANGER, "supervise", job, "-n", "2", "--backoff", "0.1", "--mpirun",
                       MPIRUN[0], "--inject-failure", "rank=1,step=5,mode=exit"], timeout=180)
    assert run.returncode == 0, run.output
    assert "restart 1/3" in run.stdout, run.output
    assert "(the run ended before its first save): starting fresh from step 0" in run.stdout, run.output
    assert np.array_equal(bits(read_params(run_dir / "model.h5")), bits(straight[2]))


def test_checkpoint_of_another_model_or_config_is_refused(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    assert mpirun(1, "train", job_file(tmp_path / "a.toml", small_dataset, run_dir,
                                       train={"max_steps": 5}), timeout=120).returncode == 0
    other_model = mpirun(2, "train", job_file(tmp_path / "b.toml", small_dataset, run_dir,
                                              model={"hidden": [8]}), "--resume", "auto", timeout=120)
    assert other_model.returncode == 2, other_model.output
    assert "holds a different model (sizes: [12, 16, 4] in the checkpoint, [12, 8, 4] in the job)" \
        in other_model.stderr
    other_lr = mpirun(2, "train", job_file(tmp_path / "c.toml", small_dataset, run_dir,
                                           optimizer={"learning_rate": 0.2}), "--resume", "auto",
                      timeout=120)
    assert other_lr.returncode == 2, other_lr.output
    assert "[optimizer].learning_rate = 0.1, the job says 0.2" in other_lr.stderr


def test_inspect_shows_layout_and_diffs(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, checkpoint={"every_steps": 20},
                   train={"max_steps": 40})
    assert mpirun(2, "train", job, timeout=120).returncode == 0
    shown = granger("inspect", run_dir)
    assert shown.returncode == 0, shown.output
    assert "step           40" in shown.stdout and "params/W1" in shown.stdout
    info = json.loads(granger("inspect", run_dir / "ckpt" / "step_00000020.h5", "--json").stdout)
    assert info["step"] == 20 and info["world_size"] == 2
    assert info["tensors"]["params/W1"]["shape"] == [12, 16]
    compared = granger("inspect", "--diff", run_dir / "ckpt" / "step_00000020.h5",
                       run_dir / "ckpt" / "step_00000040.h5")
    assert compared.returncode == 1 and "params/W1" in compared.stdout and "relative" in compared.stdout
    dump = subprocess.run(["h5dump", "-d", "/params/b1", str(run_dir / "ckpt" / "step_00000040.h5")],
                          capture_output=True, text=True, timeout=30)
    assert dump.returncode == 0 and "DATASET \"/params/b1\"" in dump.stdout


def start(ranks, *args, env=None):
    cmd = [*MPIRUN, "-n", str(ranks), *GRANGER, *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(env), start_new_session=True)


def wait_for_line(proc, text, timeout=60):
    deadline = time.time() + timeout
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if text in line:
            return lines
        if not line and proc.poll() is not None:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"never saw {text!r}; output so far:\n{''.join(lines)}\n{proc.stderr.read()}")


def output_after_acting(proc, text, act, timeout):
    """Wait for a line with ``text`` (stdout and stderr merged), call ``act()``, and return
    all the output once ``proc`` has ended (within ``timeout`` s, else its group is killed)."""
    try:
        lines = wait_for_line(proc, text, timeout=60)
        act()
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return "".join(lines) + out


@pytest.fixture
def long_job(tmp_path, small_dataset):
    return job_file(tmp_path / "long.toml", small_dataset, tmp_path / "run",
                    train={"epochs": 400}, output={"progress_interval_s": 0.2})


def test_sigusr1_to_mpirun_checkpoints_and_training_goes_on(long_job, tmp_path):
    proc = start(2, "train", long_job, *THROTTLE)
    try:
        wait_for_line(proc, "step ")
        proc.send_signal(signal.SIGUSR1)
        lines = wait_for_line(proc, "checkpoint ", timeout=60)
        saved = [line for line in lines if line.startswith("checkpoint ")][0]
        more = wait_for_line(proc, "step ", timeout=30)    # still training afterwards
        assert more
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    path = saved.split()[1]
    assert granger("inspect", path, "--verify").returncode == 0


def test_sigusr1_after_the_training_loop_is_ignored(small_dataset, tmp_path):
    """A USR1 that reaches the ranks after the loop (here: during the final checkpoint,
    which rank 0 stalls 3 s) has nothing left to save; it must not kill a rank of a run
    that completes (mpirun's exit 138)."""
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, train={"epochs": 2})
    cmd = [*MPIRUN, "-n", "2", *GRANGER, "train", str(job),
           "--inject-failure", "rank=0,step=64,mode=slow,at=checkpoint,seconds=3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(), start_new_session=True)
    out = output_after_acting(proc, "inject: rank 0 slow at step 64",
                              lambda: proc.send_signal(signal.SIGUSR1), timeout=60)
    assert proc.returncode == 0, out[-3000:]
    assert (run_dir / "COMPLETE").exists()
    assert granger("inspect", run_dir / "ckpt" / "step_00000064.h5", "--verify").returncode == 0


@pytest.mark.parametrize("program", ["module", "console script"])
def test_sigusr1_in_a_rank_s_first_moments_is_ignored(small_dataset, tmp_path, program):
    """A USR1 while a rank is still starting (a scheduler's signal that lands early) has
    nothing newer to save than what the run starts from; it must not kill the rank."""
    start_cmd = GRANGER if program == "module" else [str(Path(PYTHON).parent / "granger-mpi")]
    procs = []
    for delay in (0.2, 0.4, 0.8):
        job = job_file(tmp_path / f"d{delay}.toml", small_dataset, tmp_path / f"run{delay}",
                       train={"epochs": 1})
        proc = subprocess.Popen([*start_cmd, "train", str(job)], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=_env())
        time.sleep(delay)
        proc.send_signal(signal.SIGUSR1)
        procs.append((delay, proc))
    for delay, proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"USR1 {delay} s after the start: exit {proc.returncode}\n{out[-2000:]}"
        assert (tmp_path / f"run{delay}" / "COMPLETE").exists()


def test_sigterm_to_the_ranks_checkpoints_and_stops_cleanly(long_job, tmp_path, small_dataset):
    proc = start(2, "train", long_job, *THROTTLE)
    try:
        wait_for_line(proc, "step ")
        ranks = subprocess.run(["pgrep", "-f", f"^{PYTHON} -P -m granger_mpi train {long_job}"],
                               capture_output=True,
                               text=True).stdout.split()
        assert len(ranks) == 2, ranks
        for pid in ranks:
            os.kill(int(pid), signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, out + err
    assert "stopped on request after step" in out and "checkpoint " in out
    stopped_at = int(out.split("stopped on request after step ")[1].split(";")[0])
    assert (tmp_path / "run" / "ckpt" / f"step_{stopped_at:08d}.h5").exists()
    assert not (tmp_path / "run" / "model.h5").exists()


def test_full_disk_fails_the_save_and_keeps_earlier_checkpoints(small_dataset, tmp_path):
    with tmpfs(tmp_path / "small", "size=2m") as mount:
        run_dir = mount / "run"
        first = mpirun(2, "train", job_file(tmp_path / "a.toml", small_dataset, run_dir,
                                            train={"max_steps": 10}), timeout=120)
        assert first.returncode == 0, first.output
        good = run_dir / "ckpt" / "step_00000010.h5"
        before = good.read_bytes()
        fill(mount / "filler")
        full = mpirun(2, "train", job_file(tmp_path / "b.toml", small_dataset, run_dir,
                                           train={"max_steps": 20}), "--resume", "auto", timeout=120)
        assert full.returncode == 1, full.output
        errors = [line for line in full.stderr.splitlines() if line.startswith("granger-mpi: error")]
        assert len(errors) == 1 and errors[0].endswith("No space left on device"), full.output
        assert good.read_bytes() == before
        assert granger("inspect", good, "--verify").returncode == 0


def test_a_disk_full_before_the_first_step_is_one_error_line(small_dataset, tmp_path):
    with tmpfs(tmp_path / "small", "size=1m") as mount:
        fill(mount / "filler")
        out = mpirun(2, "train", job_file(tmp_path / "a.toml", small_dataset, mount / "run",
                                          train={"max_steps": 10}), timeout=120)
        assert out.returncode == 1, out.output
        errors = [line for line in out.stderr.splitlines() if line.startswith("granger-mpi: error")]
        assert len(errors) == 1 and errors[0].endswith("No space left on device"), out.output
        assert "Traceback" not in out.output and "MPI_ABORT" not in out.output, out.output


def fill(path):
    """Fill the file system holding ``path`` to the last byte."""
    with open(path, "wb") as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass


def test_a_failed_write_on_one_rank_fails_the_save_on_all(small_dataset, tmp_path):
    """ENOSPC injected into the last rank's write at step 20 (every rank writing): every
    rank reports it, the temporary file is removed, step 10 stays the newest and good."""
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir,
                   checkpoint={"every_steps": 10, "parallel_write_from_mib": 0})
    run = mpirun(3, "train", job, "--fail-checkpoint-write", "20", timeout=120)
    assert run.returncode == 1, run.output
    errors = [line for line in run.stderr.splitlines() if line.startswith("granger-mpi: error")]
    assert len(errors) == 1, run.output
    assert "checkpoint at step 20 could not be written" in errors[0]
    assert "No space left on device" in errors[0] and "earlier checkpoints are untouched" in errors[0]
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == ["latest", "step_00000010.h5"]
    assert json.loads((run_dir / "ckpt" / "latest").read_text())["step"] == 10
    assert granger("inspect", run_dir / "ckpt" / "step_00000010.h5", "--verify").returncode == 0


def test_a_read_failing_on_one_rank_fails_the_shared_verification_on_all(tmp_path):
    """Each rank reads its share back; one whose read fails must tell the others, which
    would otherwise wait for it in the CRC Allgather until the watchdog."""
    run = mpirun_script(2, f"""
        import numpy as np
        from mpi4py import MPI
        from granger_mpi import checkpoint
        from granger_mpi.model.models import Model
        comm = MPI.COMM_WORLD
        model = Model("mlp", (16, 8, 2), "relu", "classification")
        params = np.arange(model.layout.size, dtype=np.float32)
        state = checkpoint.Snapshot(params, params.copy(), 3, 0, 0)
        path = checkpoint.save(comm, "{tmp_path / 'run'}", model, state, job_json="{{}}", seed=0,
                               parallel_from_bytes=0)
        assert checkpoint.verify(path, comm) == []
        if comm.Get_rank() == 1:
            def broken(*args, **kwargs):
                raise OSError(5, "Input/output error")
            checkpoint.format.read_rows = broken
        print("rank", comm.Get_rank(), checkpoint.verify(path, comm), flush=True)
    """, tmp_path=tmp_path, timeout=60)
    assert run.returncode == 0, run.output
    assert "rank 0 ['" in run.stdout and "unreadable on another rank']" in run.stdout
    assert "rank 1 ['" in run.stdout and "unreadable ([Errno 5] Input/output error)']" in run.stdout


def test_a_failed_fsync_fails_the_save_and_leaves_the_directory_as_it_was(tmp_path):
    """The next index is written while the new file is being fsynced; when that fsync fails,
    the save fails on every rank and neither the file nor the next index is left behind."""
    run = mpirun_script(2, f"""
        import os
        import numpy as np
        from mpi4py import MPI
        from granger_mpi import checkpoint
        from granger_mpi.storage import fsync
        from granger_mpi.errors import UserError
        from granger_mpi.model.models import Model
        comm = MPI.COMM_WORLD
        model = Model("mlp", (16, 8, 2), "relu", "classification")
        params = np.arange(model.layout.size, dtype=np.float32)
        save = lambda step: checkpoint.save(comm, "{tmp_path / 'run'}", model,
                                            checkpoint.Snapshot(params, params.copy(), step, 0, 0),
                                            job_json="{{}}", seed=0)
        save(3)
        def failing(path, data_only=False):
            return lambda: OSError(5, "Input/output error")
        fsync.start = failing
        try:
            save(4)
        except UserError as exc:    # the error agreed on by every rank
            print("rank", comm.Get_rank(), "failed:", exc, flush=True)
        checkpoint.wait_for_pruning()
        comm.Barrier()
        if comm.Get_rank() == 0:
            print("left", sorted(os.listdir("{tmp_path / 'run' / 'ckpt'}")), flush=True)
    """, tmp_path=tmp_path, timeout=60)
    assert run.returncode == 0, run.output
    for rank in (0, 1):
        assert f"rank {rank} failed: checkpoint at step 4: Input/output error" in run.stdout, run.output
    assert "left ['latest', 'step_00000003.h5']" in run.stdout, run.output
    index = json.loads((tmp_path / "run" / "ckpt" / "latest").read_text())
    assert index["latest"] == "step_00000003.h5"


SMALL_SAVES = """
    import json, os, sys
    import numpy as np
    from mpi4py import MPI
    from granger_mpi import checkpoint
    from granger_mpi.errors import UserError
    from granger_mpi.model.models import Model
    comm = MPI.COMM_WORLD
    run_dir = sys.argv[1]
    hidden, first, last, parallel_from, fail_at, finish = map(int, sys.argv[2:])
    directory = os.path.join(run_dir, "ckpt")
    model = Model("mlp", (16, hidden, 2), "relu", "classification")
    for step in range(first, last + 1):
        params = np.arange(model.layout.size, dtype=np.float32) * step
        state = checkpoint.Snapshot(params, -params, step, step // 3, step % 3, ("velocity",))
        path = None
        try:
            path = checkpoint.save(comm, run_dir, model, state, job_json="{}", seed=0, keep_last=1,
                                   parallel_from_bytes=parallel_from << 20, fail_write=step == fail_at)
        except UserError as exc:     # raised on every rank
            if comm.Get_rank() == 0:
                print(json.dumps({"step": step, "failed": str(exc),
                                  "files": sorted(os.listdir(directory))}), flush=True)
        checkpoint.wait_for_pruning()
        if path is not None and comm.Get_rank() == 0:
            back, attrs = checkpoint.read(path, model)
            print(json.dumps({
                "step": step,
                "files": sorted(os.listdir(directory)),
                "verify": checkpoint.verify(path),
                "attrs": [int(attrs[k]) for k in ("step", "epoch", "step_in_epoch", "world_size", "writers")],
                "candidates": [p.name for p in checkpoint.candidates(run_dir)],
                "same_bits": bool(np.array_equal(back.params.view(np.uint32), params.view(np.uint32))
                                  and np.array_equal(back.optimizer_state, -params))}), flush=True)
    if finish:
        checkpoint.finish_run()
        if comm.Get_rank() == 0:
            print(json.dumps({"finished": sorted(os.listdir(directory))}), flush=True)
"""


def small_saves(tmp_path, hidden, first, last, parallel_from=64, fail_at=0, finish=0):
    run = mpirun_script(2, SMALL_SAVES, str(tmp_path / "run"), hidden, first, last, parallel_from,
                        fail_at, finish, tmp_path=tmp_path, timeout=60)
    assert run.returncode == 0, run.output
    return [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]


def good(save, parallel=False):
    """A save that verifies, reads back bitwise, with its own step and position."""
    step = save["step"]
    return (save["verify"] == [] and save["same_bits"]
            and save["attrs"] == [step, step // 3, step % 3, 2, 2 if parallel else 1])


def test_small_saves_hold_their_own_state_and_a_failed_one_leaves_no_file(tmp_path):
    """Saves by rank 0 past keep_last = 1: each file holds exactly its own state, only the
    newest is kept; a failed save (a full disk, simulated) leaves no file and the previous
    checkpoint; another model's saves in the same directory, and every rank writing."""
    saves = small_saves(tmp_path, 8, 1, 6, fail_at=5)
    assert all(good(save) for save in saves if "failed" not in save)
    for save in saves:
        if "failed" not in save:
            assert save["files"] == ["latest", f"step_{save['step']:08d}.h5"]
    assert "No space left on device" in saves[4]["failed"]
    assert saves[4]["files"] == ["latest", "step_00000004.h5"]
    assert saves[5]["candidates"] == ["step_00000006.h5"]
    saves = small_saves(tmp_path, 12, 7, 9, finish=1)
    assert all(good(save) for save in saves[:3])
    assert saves[3]["finished"] == ["latest", "step_00000009.h5"]      # the end of the run
    saves = small_saves(tmp_path, 12, 12, 12, parallel_from=0)     # every rank writes
    assert good(saves[0], parallel=True)
    assert saves[0]["files"] == ["latest", "step_00000012.h5"]


def test_a_checkpoint_holding_another_step_than_its_name_is_refused(tmp_path):
    """A whole checkpoint under another step's name (a stray copy, a bad restore)."""
    small_saves(tmp_path, 8, 1, 1)
    directory = tmp_path / "run" / "ckpt"
    os.replace(directory / "step_00000001.h5", directory / "step_00000003.h5")
    run = granger("inspect", str(directory / "step_00000003.h5"), "--verify")
    assert run.returncode == 1, run.output
    assert "holds step 1, not the step of its name" in run.output


def test_background_checkpoints_resume_bitwise_identical(straight, small_dataset, tmp_path):
    """[checkpoint].async_write: saves at 10, 20, 30 written by rank 0's writer thread while
    training goes on; a resume from them ends bit-identical to an uninterrupted run."""
    run_dir = tmp_path / "run"
    first = mpirun(2, "train", job_file(tmp_path / "a.toml", small_dataset, run_dir,
                                        train={"max_steps": 37},
                                        checkpoint={"every_steps": 10, "async_write": True}),
                   timeout=120)
    assert first.returncode == 0, first.output
    for step in (10, 20, 30):
        assert f"step_{step:08d}.h5 (step {step}, written in the background)" in first.stdout
    assert "step_00000037.h5 (step 37)" in first.stdout       # the end of a run waits for its save
    for name in ("step_00000020.h5", "step_00000030.h5", "step_00000037.h5"):
        assert granger("inspect", run_dir / "ckpt" / name, "--verify").returncode == 0
    with h5py.File(run_dir / "ckpt" / "step_00000030.h5", "r") as f:
        assert f.attrs["world_size"] == 2
    second = mpirun(2, "train", job_file(tmp_path / "b.toml", small_dataset, run_dir),
                    "--resume", run_dir / "ckpt" / "step_00000030.h5", timeout=120)
    assert second.returncode == 0, second.output
    assert np.array_equal(bits(read_params(run_dir / "model.h5")), bits(straight[2]))


def test_a_failed_background_save_fails_the_run_at_the_next_save(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir,
                   checkpoint={"every_steps": 10, "async_write": True})
    run = mpirun(2, "train", job, "--fail-checkpoint-write", "20", timeout=120)
    assert run.returncode == 1, run.output
    errors = [line for line in run.stderr.splitlines() if line.startswith("granger-mpi: error")]
    assert len(errors) == 1, run.output
    assert "checkpoint at step 20 could not be written" in errors[0]
    assert "No space left on device" in errors[0]
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == ["latest", "step_00000010.h5"]
    assert json.loads((run_dir / "ckpt" / "latest").read_text())["step"] == 10


def test_stop_file_saves_and_stops_then_resume_finishes_identically(straight, small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "STOP").touch()
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir)
    stopped = mpirun(2, "train", job, timeout=120)
    assert stopped.returncode == 3, stopped.output
    assert "stopped on request after step 1;" in stopped.stdout
    assert (run_dir / "ckpt" / "step_00000001.h5").exists() and not (run_dir / "STOP").exists()
    resumed = mpirun(2, "train", job, "--resume", "auto", timeout=120)
    assert resumed.returncode == 0, resumed.output
    assert np.array_equal(bits(read_params(run_dir / "model.h5")), bits(straight[2]))


def test_timed_checkpoints(small_dataset, tmp_path):
    """Every 0.2 s of wall clock: rank 1 stalls 0.5 s at steps 200 and 600, so that at least
    those two saves are due however fast the machine (all 960 steps took 0.36 s on one)."""
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, train={"epochs": 30},
                   checkpoint={"every_seconds": 0.2, "keep_last": 2, "at_end": False})
    run = mpirun(2, "train", job, *THROTTLE, "--inject-failure", "rank=1,step=200,mode=slow,seconds=0.5",
                 "--inject-failure", "rank=1,step=600,mode=slow,seconds=0.5", timeout=120)
    assert run.returncode == 0, run.output
    saved = [int(m.group(1)) for m in re.finditer(r"^checkpoint .* \(step (\d+)\)$", run.stdout, re.M)]
    # rank 0 sees the time at the next step's start, and all ranks save at the step after
    assert any(200 <= s <= 203 for s in saved) and any(600 <= s <= 603 for s in saved), saved
    kept = sorted(p.name for p in (run_dir / "ckpt").glob("step_*.h5"))
    assert len(kept) == 2                                      # keep_last prunes the rest
    index = json.loads((run_dir / "ckpt" / "latest").read_text())
    assert index["latest"] == kept[-1] and index["kept"] == kept
    # every temporary file is gone once the run has ended
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == ["latest", *kept]


def test_supervise_restarts_after_a_killed_rank_and_ends_bitwise_identical(straight, small_dataset,
                                                                           tmp_path):
    """A rank is SIGKILLed from outside after the first checkpoint; the supervisor restarts
    the job from it and the final parameters equal an undisturbed run's."""
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, checkpoint={"every_steps": 10},
                   train={"epochs": 3}, output={"progress_interval_s": 0.0})
    # rank 1 hangs at step 12 so that the run cannot end before the kill, however fast (the
    # restart drops the injection)
    cmd = [*GRANGER, "supervise", str(job), "-n", "2", "--backoff", "0.1",
           "--mpirun", str(MPIRUN[0]), "--inject-failure", "rank=1,step=12,mode=hang"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(), start_new_session=True)
    def kill_a_rank():
        ranks = subprocess.run(["pgrep", "-f", f"^{PYTHON} -P -m granger_mpi train {job}"],
                               capture_output=True, text=True).stdout.split()
        assert len(ranks) == 2, ranks
        os.kill(int(ranks[1]), signal.SIGKILL)
    out = output_after_acting(proc, "checkpoint ", kill_a_rank, timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "supervise: the run failed" in out and "restart 1/3" in out
    assert "resuming from" in out
    assert json.loads((run_dir / "COMPLETE").read_text())["steps"] == 96
    assert np.array_equal(bits(read_params(run_dir / "model.h5")), bits(straight[2]))


def test_supervise_passes_bad_input_on_without_restarting(tmp_path, small_dataset):
    job = job_file(tmp_path / "a.toml", small_dataset, tmp_path / "run",
                   optimizer={"learning_rate": -1.0})
    run = run_command([*GRANGER, "supervise", job, "-n", "2", "--mpirun",
                       MPIRUN[0]], timeout=60)
    assert run.returncode == 2 and "restart" not in run.stdout, run.output


def test_a_checkpoint_of_the_old_partition_rule_is_refused(small_dataset, tmp_path):
    """Rule 1 (every rank shuffling the whole file) cannot say which rows its epoch has
    left under lanes: the resume stops with exit 2 and says so, and writes nothing."""
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, train={"max_steps": 10})
    assert mpirun(2, "train", job, timeout=120).returncode == 0
    ckpt = run_dir / "ckpt" / "step_00000010.h5"
    with h5py.File(ckpt, "r") as f:
        assert f.attrs["partition_rule"] == partition.RULE == 2
    with h5py.File(ckpt, "r+") as f:
        del f.attrs["partition_rule"]          # as every checkpoint before rule 2
        manifest.rewrite(f)                    # (and migrated to format version 2)
    seal.seal(ckpt)
    again = mpirun(2, "train", job_file(tmp_path / "b.toml", small_dataset, run_dir),
                   "--resume", str(ckpt), timeout=120)
    assert again.returncode == 2, again.output
    assert "was made under partition rule 1" in again.stderr, again.output


def test_resume_on_another_dataset_of_the_same_size_is_refused(small_dataset, tmp_path):
    """The row count alone let any dataset of 2,000 rows continue a run (#27 item 4): the
    checkpoint records the dataset's fingerprint (its block checksums), and a mismatch is
    exit 2 naming both files' fingerprints."""
    run_dir = tmp_path / "run"
    assert mpirun(2, "train", job_file(tmp_path / "a.toml", small_dataset, run_dir,
                                       train={"max_steps": 10}), timeout=120).returncode == 0
    other = tmp_path / "other.h5"
    run = mpirun(2, "make-dataset", other, "--rows", "2000", "--features", "12", "--classes", "4",
                 "--seed", "6")
    assert run.returncode == 0, run.output
    again = mpirun(2, "train", job_file(tmp_path / "b.toml", other, run_dir), "--resume", "auto",
                   timeout=120)
    assert again.returncode == 2, again.output
    assert "was made on another dataset" in again.stderr and str(other) in again.stderr, again.output


def test_resume_with_a_cosine_schedule_over_other_steps_is_refused(small_dataset, tmp_path):
    """The cosine schedule spans the run's steps: more epochs on resume would change every
    learning rate after the checkpoint, so it is refused; a constant schedule may go on."""
    run_dir = tmp_path / "run"
    cosine = {"learning_rate": 0.1, "schedule": "cosine"}
    first = job_file(tmp_path / "a.toml", small_dataset, run_dir, train={"epochs": 2, "max_steps": 10},
                     optimizer=cosine)
    assert mpirun(2, "train", first, timeout=120).returncode == 0
    longer = job_file(tmp_path / "b.toml", small_dataset, run_dir, train={"epochs": 3}, optimizer=cosine)
    again = mpirun(2, "train", longer, "--resume", "auto", timeout=120)
    assert again.returncode == 2, again.output
    assert "cosine" in again.stderr and "over 10 steps" in again.stderr and "96" in again.stderr, again.output


def test_resume_auto_follows_the_index_and_sets_an_abandoned_branch_aside(small_dataset, tmp_path):
    """A user rolls back to step 80 after step 96 (diverged) and the rolled-back run saves
    90: `--resume auto` must continue from 90, the branch the index names, not from the
    abandoned 96; 96 is moved to ckpt/abandoned/ (never deleted) and `inspect` lists it
    (#27 item 1)."""
    run_dir = tmp_path / "run"
    saves = {"every_steps": 8, "keep_last": 3}
    assert mpirun(2, "train", job_file(tmp_path / "a.toml", small_dataset, run_dir, checkpoint=saves),
                  timeout=120).returncode == 0
    ckpt = run_dir / "ckpt"
    assert (ckpt / "step_00000096.h5").exists()
    rolled = mpirun(2, "train", job_file(tmp_path / "b.toml", small_dataset, run_dir, checkpoint=saves,
                                         train={"max_steps": 90}),
                    "--resume", ckpt / "step_00000080.h5", timeout=120)
    assert rolled.returncode == 0, rolled.output
    assert json.loads((ckpt / "latest").read_text())["step"] == 90
    assert not (ckpt / "step_00000096.h5").exists()
    assert (ckpt / "abandoned" / "step_00000096.h5").exists()
    listed = granger("inspect", run_dir)
    assert "abandoned" in listed.stdout and "step_00000096.h5" in listed.stdout, listed.output
    again = mpirun(2, "train", job_file(tmp_path / "c.toml", small_dataset, run_dir, checkpoint=saves),
                   "--resume", "auto", timeout=120)
    assert again.returncode == 0, again.output
    assert "step_00000090.h5: step 90" in again.stdout, again.output


def test_resume_auto_without_an_index_scans_the_directory(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    assert mpirun(2, "train", job_file(tmp_path / "a.toml", small_dataset, run_dir,
                                       checkpoint={"every_steps": 8}, train={"max_steps": 40}),
                  timeout=120).returncode == 0
    (run_dir / "ckpt" / "latest").unlink()
    again = mpirun(2, "train", job_file(tmp_path / "b.toml", small_dataset, run_dir), "--resume", "auto",
                   timeout=120)
    assert again.returncode == 0 and "step_00000040.h5: step 40" in again.stdout, again.output


def test_a_damaged_metrics_file_is_set_aside_on_resume(small_dataset, tmp_path):
    """A node crash during a flush leaves metrics.h5 unreadable: the resume keeps it aside,
    says where, starts a new one at the checkpoint's step and goes on (#27 item 3; it
    was a traceback and exit 1, so supervise used up its restarts)."""
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, train={"max_steps": 40},
                   checkpoint={"every_steps": 20}, output={"jsonl": True})
    assert mpirun(2, "train", job, timeout=120).returncode == 0
    metrics = run_dir / "metrics.h5"
    metrics.write_bytes(metrics.read_bytes()[:1000])           # torn mid-write
    again = mpirun(2, "train", job_file(tmp_path / "b.toml", small_dataset, run_dir,
                                        checkpoint={"every_steps": 20}, output={"jsonl": True}),
                   "--resume", "auto", timeout=120)
    assert again.returncode == 0, again.output
    aside = list(run_dir.glob("metrics.damaged-*.h5"))
    assert len(aside) == 1 and f"kept as {aside[0]}" in again.stdout, again.output
    with h5py.File(metrics) as f:
        assert f["step"][0] == 40 and f["step"][-1] == 95
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["type"] == "step"]
    assert steps == list(range(96))                             # the JSON lines lost nothing


def test_an_old_checkpoint_that_cannot_be_deleted_is_a_warning_not_a_failure(small_dataset, tmp_path):
    """#27 item 13: a failed prune failed the run before model.h5. Here the 'checkpoint' is
    a directory, which unlink refuses; the run warns, leaves it and completes."""
    run_dir = tmp_path / "run"
    (run_dir / "ckpt" / "step_00000001.h5").mkdir(parents=True)
    (run_dir / "ckpt" / "step_00000002.h5.tmp").write_bytes(b"torn")     # a crashed save's
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, train={"max_steps": 24},
                   checkpoint={"every_steps": 8, "keep_last": 1})
    run = mpirun(2, "train", job, timeout=120)
    assert run.returncode == 0, run.output
    assert "could not delete old checkpoint" in run.stderr and "step_00000001.h5" in run.stderr
    assert (run_dir / "model.h5").exists()
    assert sorted(p.name for p in (run_dir / "ckpt").iterdir()) == ["latest", "step_00000001.h5",
                                                                   "step_00000024.h5"]
