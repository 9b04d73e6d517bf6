"""Pure bookkeeping of fault tolerance: limits, injection specs, the status table."""

import json
import os
import time
from types import SimpleNamespace

import pytest

from granger_mpi import faults
from granger_mpi.observe import status
from granger_mpi.errors import UserError
from granger_mpi.launch.supervise import _for_restart
from granger_mpi.training.recovery import past_limits as _past_limits


def limits(**kw):
    return SimpleNamespace(**{"min_ranks": 1, "max_failures": 3, "max_failures_per_node": 3, **kw})


def test_limits_total_per_node_and_min_ranks():
    hosts = ["a", "a", "a", "a", "b", "b", "b", "b"]
    assert _past_limits(limits(), 6, [1, 5], hosts) is None
    assert "max_failures is 3" in _past_limits(limits(), 4, [0, 1, 4, 5], hosts)
    assert "on host a" in _past_limits(limits(max_failures=8, max_failures_per_node=1), 6, [0, 1], hosts)
    assert _past_limits(limits(max_failures=8, max_failures_per_node=1), 6, [0, 4], hosts) is None
    assert "min_ranks is 7" in _past_limits(limits(min_ranks=7), 6, [0, 4], hosts)


def test_injection_specs():
    assert faults.parse("rank=2,step=30") == faults.Injection(2, 30, "kill9", "compute")
    assert str(faults.parse("rank=0, step=5, mode=hang, at=checkpoint")) == \
        "rank=0,step=5,mode=hang,at=checkpoint"
    assert faults.parse("rank=1,step=5,mode=slow,seconds=0.5") == \
        faults.Injection(1, 5, "slow", "compute", 0.5)
    assert str(faults.parse("rank=1,step=5,mode=slow")) == "rank=1,step=5,mode=slow,at=compute,seconds=1"
    for bad in ("rank=2", "rank=x,step=1", "rank=1,step=1,mode=explode", "rank=1,step=1,where=x",
                "rank=1,step=1,mode=kill9,seconds=2", "rank=1,step=1,mode=slow,seconds=-1",
                "rank=1,step=1,mode=slow,seconds=x", "rank=1,step=*,mode=kill9", "rank=-2,step=1"):
        with pytest.raises(UserError, match="--inject-failure"):
            faults.parse(bad)


def test_a_throttle_pauses_every_step_and_the_other_injections_still_fire(monkeypatch):
    throttle = faults.parse("rank=*,step=*,mode=slow,seconds=0.01")
    assert str(throttle) == "rank=*,step=*,mode=slow,at=compute,seconds=0.01"
    pauses, fired = [], []
    monkeypatch.setattr(faults.time, "sleep", pauses.append)
    monkeypatch.setattr(faults, "fail", fired.append)
    stall = faults.parse("rank=3,step=2,mode=slow,seconds=5")
    injector = faults.Injector([throttle, stall], world_rank=3)
    for step in range(4):
        injector.at_compute(step)
        injector.at_report(step)
    assert pauses == [0.01] * 4 and fired == [stall]
    assert faults.Injector([throttle, stall], world_rank=0).pending == [throttle]


def test_a_restart_drops_the_earliest_injection_and_overwrite():
    args = ["--overwrite", "--inject-failure", "rank=1,step=90", "--inject-failure=rank=3,step=40"]
    assert _for_restart(args) == ["--inject-failure=rank=1,step=90"]
    assert _for_restart(_for_restart(args)) == []
    # A straggler ends no run: the kill is what is dropped, the slow rank stays planned.
    slow = "--inject-failure=rank=0,step=10,mode=slow"
    assert _for_restart([slow, "--inject-failure=rank=1,step=50"]) == [slow]


def test_status_table_marks_silent_ranks_lost(tmp_path):
    now = time.time()
    (tmp_path / "status").mkdir()
    for rank, (state, updated) in enumerate([("AGGREGATING", now), ("TRAINING", now - 60),
                                             ("FAILED", now - 5)]):
        record = {"rank": rank, "world_size": 3, "host": "h", "pid": 100 + rank, "state": state,
                  "step": 7, "since": now - 1, "updated": updated, "mode": "ulfm",
                  "ranks_alive": 3, "failures": 0, "note": "", "interval_s": 1.0}
        (tmp_path / "status" / f"rank-{rank:05d}.json").write_text(json.dumps(record))
    text, live = status.table(tmp_path, now=now)
    assert live
    assert "1 of 3 rank(s) alive" in text and "2 rank(s) failed" in text
    states = [line.split()[3] for line in text.splitlines()[2:]]
    assert states == ["AGGREGATING", "LOST?", "FAILED"]


def test_watchdog_limits(tmp_path):
    watch = status.RankStatus(tmp_path, 0, 1, "restart", step_timeout_s=0, slow_timeout_s=100)
    watch.set(status.TRAINING, 0)
    assert watch.limit_s() == 100                 # too few steps timed yet
    watch.step_times.extend([0.01] * 20)
    assert watch.limit_s() == status.AUTO_FLOOR_S  # 50 x 10 ms is below the floor
    watch.step_times.extend([2.0] * 40)
    assert watch.limit_s() == 100.0               # 50 x median 2 s
    watch.set(status.CHECKPOINTING)
    assert watch.limit_s() == 100
    watch.set(status.IDLE)
    assert watch.limit_s() is None


def test_the_restart_backoff_doubles_up_to_its_cap(tmp_path, monkeypatch, small_dataset):
    """#27 item 13: 2 ** restarts seconds had no cap (the 20th restart waited 6 days)."""
    from conftest import write_job
    from granger_mpi.launch import supervise
    job = write_job(tmp_path / "job.toml", dataset=small_dataset, run_dir=tmp_path / "run")
    waits = []
    monkeypatch.setattr(supervise.subprocess, "call", lambda *a, **k: 1)     # every run fails
    monkeypatch.setattr(supervise.time, "sleep", waits.append)
    code = supervise.supervise(job, 2, max_restarts=12, backoff_s=1.0, max_backoff_s=300.0,
                               out=lambda line: None)
    assert code == supervise.EXIT_GAVE_UP
    assert waits == [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]


def test_the_watchdog_aborts_even_when_the_status_file_system_hangs(tmp_path):
    """#27 item 6: the watchdog wrote its status file before checking its limit, and read and
    printed before aborting, so a hung file system under run_dir (NFS, Lustre) blinded it.
    A FIFO with no reader stands in for the hung file: opening it for writing never returns."""
    (tmp_path / "status").mkdir()
    os.mkfifo(tmp_path / "status" / "rank-00000.json.tmp")
    aborted = []
    with open(tmp_path / "stderr.txt", "w") as err:
        watched = status.RankStatus(tmp_path, 0, 1, "restart", interval_s=0.05, step_timeout_s=0.3,
                                    abort=aborted.append, out=err)
        watched.start()
        watched.set(status.TRAINING, 7)
        deadline = time.monotonic() + 30
        while not aborted and time.monotonic() < deadline:
            time.sleep(0.05)
    assert aborted == [6]
    assert "watchdog: step 7 has not finished" in (tmp_path / "stderr.txt").read_text()
