"""The recovery protocol under ULFM, case by case: a rank killed at each place of a step
and of the end of a run, for each victim kind, under two algorithms (docs/architecture.md,
"Recovery"). Each case must finish (exit 0, COMPLETE) with every sample used once per
epoch, metrics holding every step exactly once, and every checkpoint the run published
resuming to the run's own result. CI runs a subset (every victim and place at least once);
``scripts/test --slow`` runs the whole matrix.
"""

import itertools
import json
import os
import threading

import h5py
import numpy as np
import pytest

from conftest import mpirun, read_params
from test_checkpoint import job_file
from test_fault import assert_every_sample_once, completion, ulfm_train

P = 4
STEPS = 96          # small_dataset, 3 epochs of 32 steps
PLACES = {          # place: the injection (steps counted from 0, or steps done at the end)
    "compute": "step=33,at=compute",
    "allreduce before a checkpoint": "step=39,at=allreduce",
    "checkpoint": "step=40,at=checkpoint",
    "timing report": "step=49,at=report",
    "validation": "step=59,at=validation",
    "final step": "step=95,at=allreduce",
    "final save": "step=96,at=checkpoint",
    "after the final save": "step=96,at=end",
}
VICTIMS = {"first": 0, "middle": 1, "last": P - 1}
CASES = list(itertools.product(VICTIMS, PLACES, ("rd", "ring")))
# CI: every victim and every place at least once, both algorithms.
QUICK = [("first", "allreduce before a checkpoint", "rd"), ("middle", "compute", "ring"),
         ("last", "checkpoint", "ring"), ("first", "checkpoint", "rd"),
         ("middle", "timing report", "rd"), ("last", "final step", "rd"),
         ("first", "final save", "ring"), ("first", "after the final save", "rd"),
         ("middle", "allreduce before a checkpoint", "ring"), ("last", "validation", "ring")]


LIVE_REPORTER = """
import json, os
from granger_mpi.reporters import Reporter

class Live(Reporter):
    def __init__(self, path):
        self.path = path
    def step(self, row):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": row["step"], "run_id": row["run_id"],
                                "generation": row["generation"]}) + "\\n")

def make(run_dir, job):
    return Live(run_dir / f"live-{os.getpid()}.jsonl")
"""


class Published:
    """Hard links to every checkpoint file as it appears in ``ckpt/`` (one per inode: a
    step written again is a new file), made by a thread polling the directory."""

    def __init__(self, run_dir, into):
        self.ckpt, self.into = run_dir / "ckpt", into
        into.mkdir()
        self.seen = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self):
        while not self._stop.wait(0.002):
            for path in self.ckpt.glob("step_*.h5"):
                try:
                    key = (path.name, os.stat(path).st_ino)
                    if key not in self.seen:
                        os.link(path, self.into / f"{path.stem}.{key[1]}.h5")
                        self.seen.add(key)
                except FileNotFoundError:
                    pass

    def stop(self):
        self._stop.set()
        self._thread.join()
        return sorted(self.into.glob("*.h5"))


def run_case(small_dataset, tmp_path, victim, place, algorithm):
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir,
                   data={"validation_path": str(small_dataset.with_name("small-test.h5"))},
                   train={"validate_every_steps": 20},
                   collectives={"algorithm": algorithm},
                   checkpoint={"every_steps": 20, "keep_last": 100},
                   output={"timing_every_steps": 10, "jsonl": True, "reporters": ["livereporter:make"]},
                   fault={"step_timeout_s": 30.0})
    (tmp_path / "livereporter.py").write_text(LIVE_REPORTER)
    published = Published(run_dir, tmp_path / "published")
    try:
        run, log_dir = ulfm_train(P, job, f"rank={victim},{PLACES[place]}", tmp_path=tmp_path,
                                  timeout=120, env={"PYTHONPATH": str(tmp_path)})
    finally:
        copies = published.stop()
    record = completion(run_dir, run)
    assert run.returncode == 0, run.output[-4000:]
    assert (record["steps"], record["world_size"], record["lost_world_ranks"]) == (STEPS, P - 1, [victim])
    assert "rank failure at step" in run.stdout
    assert_every_sample_once(log_dir, 3)
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        assert f["step"][...].tolist() == list(range(STEPS)), "metrics.h5: a step missing or twice"
        validated = np.flatnonzero(np.isfinite(f["val_loss"][...])).tolist()
        assert validated == [19, 39, 59, 79, 95], f"validations: {validated}"
        windows = f["ranks/step"][...]
        assert np.all(np.diff(windows) > 0), f"a timing window twice: {windows}"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["type"] == "step"] == list(range(STEPS))
    # A live reporter: each writer's got every step once, in order, never a rolled-back one
    # twice; a writer that took over starts again from what it kept (at least once).
    writers = sorted(run_dir.glob("live-*.jsonl"), key=lambda path: path.stat().st_mtime)
    assert len(writers) == (2 if victim == 0 else 1), writers
    seen = [[json.loads(line) for line in path.read_text().splitlines()] for path in writers]
    for records in seen:
        steps = [r["step"] for r in records]
        assert steps == sorted(set(steps)), f"a step twice or out of order: {steps}"
        assert len({r["run_id"] for r in records}) == 1
    assert {r["step"] for records in seen for r in records} == set(range(STEPS))
    return job, run_dir, copies


def assert_published_checkpoints_resume_to_the_runs_result(job, run_dir, copies, tmp_path, since):
    """Each checkpoint published at step >= ``since`` resumes at P - 1 to within 1e-4 of the
    run's own parameters (a checkpoint labelled one step off misses by far more)."""
    ours = read_params(run_dir / "model.h5").astype(np.float64)
    checked = 0
    for copy in copies:
        with h5py.File(copy, "r") as f:
            step = int(f.attrs["step"])
        if step < since:
            continue
        out = tmp_path / f"resumed-{copy.stem}"
        resumed = mpirun(P - 1, "train", job, "--resume", copy, "--run-dir", out, timeout=120,
                         env={"PYTHONPATH": str(tmp_path)})    # the job names livereporter
        assert resumed.returncode == 0, resumed.output[-3000:]
        theirs = read_params(out / "model.h5").astype(np.float64)
        error = np.abs(theirs - ours).max() / np.abs(ours).max()
        assert error <= 1e-4, f"{copy.name} (step {step}) resumes {error:.2e} away from the run's result"
        checked += 1
    assert checked, f"no checkpoint published at or after step {since}: {[c.name for c in copies]}"


def check(small_dataset, tmp_path, victim, place, algorithm):
    job, run_dir, copies = run_case(small_dataset, tmp_path, VICTIMS[victim], place, algorithm)
    failed_at = int(PLACES[place].split(",")[0].split("=")[1])
    assert_published_checkpoints_resume_to_the_runs_result(job, run_dir, copies, tmp_path,
                                                           since=min(failed_at - 19, 80))


@pytest.mark.parametrize("victim, place, algorithm", QUICK)
def test_a_rank_killed_at_each_place_finishes_with_everything_once(small_dataset, tmp_path,
                                                                   victim, place, algorithm):
    check(small_dataset, tmp_path, victim, place, algorithm)


@pytest.mark.slow
@pytest.mark.parametrize("victim, place, algorithm", [c for c in CASES if c not in QUICK])
def test_the_whole_matrix(small_dataset, tmp_path, victim, place, algorithm):
    check(small_dataset, tmp_path, victim, place, algorithm)


@pytest.mark.parametrize("algorithm, injections, lost", [
    # two ranks killed in the same step
    ("ring", ("rank=1,step=40,at=allreduce", "rank=2,step=40,at=allreduce"), [1, 2]),
    # rank 3 dies as it starts recovering from rank 1's failure: the survivors' shrink or
    # agreement fails, and they shrink again
    ("rd", ("rank=1,step=40,at=compute", "rank=3,step=40,at=recovery"), [1, 3]),
], ids=["two in one step", "one during the recovery"])
def test_two_failures_close_together(small_dataset, tmp_path, algorithm, injections, lost):
    run_dir = tmp_path / "run"
    job = job_file(tmp_path / "a.toml", small_dataset, run_dir, collectives={"algorithm": algorithm})
    run, log_dir = ulfm_train(P, job, *injections, tmp_path=tmp_path)
    record = completion(run_dir, run)
    assert record["world_size"] == 2 and sorted(record["lost_world_ranks"]) == lost, record
    assert_every_sample_once(log_dir, 3)
