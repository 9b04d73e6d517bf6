"""Spare ranks (``[fault].spares``): a spare takes a dead rank's place, receives the state
from a survivor, and the run ends with the parameters of an undisturbed run at P, bit for
bit; an idle spare costs (almost) no CPU; with the spares used up the job shrinks.
"""

import json
import os
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest

from conftest import GRANGER, MPIRUN, ULFM_FLAGS, _env, granger, mpirun, read_params
from test_checkpoint import bits, job_file
from test_fault import assert_every_sample_once, completion, ulfm_train
from granger_mpi.training.spares import Roles

P = 4
STEPS = 96          # small_dataset, 3 epochs of 32 steps
PLACES = {"compute": "step=33,at=compute", "allreduce before a checkpoint": "step=39,at=allreduce",
          "checkpoint": "step=40,at=checkpoint"}
VICTIMS = {"first": 0, "middle": 1, "last": P - 1}
CASES = [("first", "allreduce before a checkpoint"), ("middle", "compute"), ("last", "checkpoint"),
         ("first", "compute"), ("middle", "checkpoint"), ("last", "allreduce before a checkpoint")]
QUICK = CASES[:3]     # every victim and place once; scripts/test --slow runs the others


def test_a_dead_rank_s_place_goes_to_the_first_spare_left():
    roles = Roles.initial(7, 3)
    assert roles == Roles((0, 1, 2, 3), (4, 5, 6))
    after, replaced = roles.after({0, 2, 3, 5, 6})      # rank 1 and spare 4 died
    assert after == Roles((0, 5, 2, 3), (6,)) and replaced == {5: 1}
    after, replaced = after.after({0, 2, 3})             # the spare in place 1 and the last spare
    assert after == Roles((0, 2, 3), ()) and replaced == {}     # none left: the job shrinks
    after, replaced = Roles((0, 1, 2), (3,)).after({2, 3})
    assert after == Roles((3, 2), ()) and replaced == {3: 0}    # one place filled, one dropped


def spare_job(tmp_path, small_dataset, name, spares):
    return job_file(tmp_path / f"{name}.toml", small_dataset, tmp_path / name,
                    collectives={"algorithm": "rd"},
                    checkpoint={"every_steps": 20, "keep_last": 100},
                    output={"jsonl": True, "timing_every_steps": 10},
                    fault={"spares": spares, "step_timeout_s": 30.0})


@pytest.fixture(scope="module")
def undisturbed(small_dataset, tmp_path_factory):
    """The final parameters of the job at P = 4 without spares or failures, under ULFM."""
    base = tmp_path_factory.mktemp("undisturbed")
    run, _ = ulfm_train(P, spare_job(base, small_dataset, "p4", 0), tmp_path=base)
    assert run.returncode == 0, run.output[-3000:]
    return read_params(base / "p4" / "model.h5")


def events(run_dir):
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        steps = f["step"][...].tolist()
        group = f["events"]
        return steps, {name: group[name][...].tolist() for name in group}


def test_an_idle_spare_changes_nothing_and_burns_no_cpu(small_dataset, tmp_path, undisturbed):
    job = spare_job(tmp_path, small_dataset, "run", 1)
    # 20 ms a step: long enough for the spare's CPU time to mean something
    run, log_dir = ulfm_train(P + 1, job, "rank=*,step=*,mode=slow,seconds=0.02", tmp_path=tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    record = completion(tmp_path / "run", run)
    assert (record["steps"], record["world_size"], record["lost_world_ranks"]) == (STEPS, P, [])
    assert np.array_equal(bits(read_params(tmp_path / "run" / "model.h5")), bits(undisturbed)), \
        "an idle spare changed the result"
    assert "spares: world rank(s) [4] wait idle" in run.stdout
    assert_every_sample_once(log_dir, 3)
    status = json.loads((tmp_path / "run" / "status" / "rank-00004.json").read_text())
    note = status["note"]
    assert status["state"] == "IDLE" and note.startswith("spare, not needed"), status
    idle_s, cpu_s = (float(part.split()[1]) for part in note.split("; ")[1:3])
    # Open MPI's blocking waits spin a whole core: a spare that did would be near idle_s.
    assert idle_s > 0.5 and cpu_s < 0.2 * idle_s, note


def check_replaced(small_dataset, tmp_path, undisturbed, victim, place):
    run_dir = tmp_path / "run"
    job = spare_job(tmp_path, small_dataset, "run", 1)
    run, log_dir = ulfm_train(P + 1, job, f"rank={victim},{PLACES[place]}", tmp_path=tmp_path)
    assert run.returncode == 0, run.output[-4000:]
    record = completion(run_dir, run)
    assert (record["steps"], record["world_size"], record["lost_world_ranks"]) == (STEPS, P, [victim])
    assert f"spare world rank 4 takes the place of world rank {victim}" in run.stdout, run.stdout[-3000:]
    assert "resuming from" not in run.output     # the state came over MPI, not from a checkpoint
    assert np.array_equal(bits(read_params(run_dir / "model.h5")), bits(undisturbed)), \
        "the spare's run differs from the undisturbed run at P"
    assert_every_sample_once(log_dir, 3)
    steps, event = events(run_dir)
    assert steps == list(range(STEPS)), "metrics.h5: a step missing or twice"
    assert event["spares_used"] == [1] and event["world_size"] == [P] and event["ranks_lost"] == [1]
    assert 0 < event["transfer_s"][0] < event["recovery_s"][0], event
    status = json.loads((run_dir / "status" / f"rank-{victim:05d}.json").read_text())
    assert status["state"] == "FAILED", status


@pytest.mark.parametrize("victim, place", QUICK)
def test_a_spare_takes_the_dead_rank_s_place_bit_for_bit(small_dataset, tmp_path, undisturbed,
                                                          victim, place):
    check_replaced(small_dataset, tmp_path, undisturbed, VICTIMS[victim], place)


@pytest.mark.slow
@pytest.mark.parametrize("victim, place", CASES[3:])
def test_a_spare_takes_each_victim_s_place_at_each_place(small_dataset, tmp_path, undisturbed,
                                                         victim, place):
    check_replaced(small_dataset, tmp_path, undisturbed, VICTIMS[victim], place)


def test_two_ranks_killed_in_one_step_are_both_replaced(small_dataset, tmp_path, undisturbed):
    run_dir = tmp_path / "run"
    job = spare_job(tmp_path, small_dataset, "run", 2)
    run, log_dir = ulfm_train(P + 2, job, "rank=0,step=39,at=allreduce", "rank=2,step=39,at=allreduce",
                              tmp_path=tmp_path)
    assert run.returncode == 0, run.output[-4000:]
    record = completion(run_dir, run)
    assert (record["world_size"], sorted(record["lost_world_ranks"])) == (P, [0, 2]), record
    assert np.array_equal(bits(read_params(run_dir / "model.h5")), bits(undisturbed))
    assert_every_sample_once(log_dir, 3)
    _, event = events(run_dir)
    assert sum(event["spares_used"]) == 2 and event["world_size"][-1] == P, event


def test_with_the_spares_used_up_the_job_shrinks(small_dataset, tmp_path):
    """Rank 1 dies and spare 4 takes its place; then rank 4 itself dies (an injection names
    a world rank), no spare is left, and the run finishes on 3 ranks."""
    run_dir = tmp_path / "run"
    job = spare_job(tmp_path, small_dataset, "run", 1)
    run, log_dir = ulfm_train(P + 1, job, "rank=1,step=20,at=compute", "rank=4,step=60,at=allreduce",
                              tmp_path=tmp_path)
    assert run.returncode == 0, run.output[-4000:]
    record = completion(run_dir, run)
    assert (record["steps"], record["world_size"], record["lost_world_ranks"]) == (STEPS, P - 1, [1, 4])
    assert "3 continue from step 60" in run.stdout, run.stdout[-3000:]
    assert_every_sample_once(log_dir, 3)
    _, event = events(run_dir)
    assert event["spares_used"] == [1, 0] and event["world_size"] == [P, P - 1]


def test_spares_are_refused_where_they_could_never_help(small_dataset, tmp_path):
    job = spare_job(tmp_path, small_dataset, "restart", 1)
    text = job.read_text().replace("[fault]\n", '[fault]\nmode = "restart"\n')
    job.write_text(text)
    run = mpirun(2, "train", job, timeout=60)
    assert run.returncode == 2 and "[fault].spares needs ULFM" in run.stderr, run.output
    run = mpirun(2, "train", spare_job(tmp_path, small_dataset, "all", 2), timeout=60)
    assert run.returncode == 2 and "leaves no training rank of the 2 launched" in run.stderr, run.output
    dry = granger("run", spare_job(tmp_path, small_dataset, "dry", 0), "-n", "4", "--spares", "2", "--dry-run")
    assert dry.returncode == 0 and " -n 6 " in dry.stdout and "--spares 2" in dry.stdout, dry.output


def test_a_spare_that_dies_idle_is_dropped_and_the_run_completes(small_dataset, tmp_path, undisturbed):
    """SIGKILL to the idle spare: nobody needs it, so nobody waits for it; the run ends as
    an undisturbed one (its release to the dead spare is skipped)."""
    run_dir = tmp_path / "run"
    job = spare_job(tmp_path, small_dataset, "run", 1)
    cmd = [*MPIRUN, "-n", str(P + 1), *ULFM_FLAGS, *GRANGER, "train", str(job),
           "--inject-failure", "rank=*,step=*,mode=slow,seconds=0.03"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=_env(), start_new_session=True)
    try:
        status_file = run_dir / "status" / "rank-00004.json"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                record = json.loads(status_file.read_text())
            except (OSError, ValueError):
                record = {}
            if record.get("state") == "SPARE":
                break
            time.sleep(0.05)
        assert record.get("state") == "SPARE", record
        os.kill(record["pid"], signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    record = json.loads((run_dir / "COMPLETE").read_text())
    assert (record["steps"], record["world_size"]) == (STEPS, P), (record, out[-3000:])
    assert np.array_equal(bits(read_params(run_dir / "model.h5")), bits(undisturbed))
