"""Periodic validation (``[train].validate_every_steps``, ``[data].validation_path``): the loss
and accuracy of the parameters on the whole validation set, checked against numpy on each
checkpoint of the same step; in ``metrics.h5``, JSON lines and the progress line; exactly once
per validated step across a rank failure inside the validation (rank 0's too)."""

import json

import h5py
import numpy as np
import pytest

import reference
from conftest import mpirun, read_params
from test_bad_inputs import check_rejected
from test_checkpoint import bits, job_file
from test_fault import ulfm_train

EVERY = 20
STEPS = 96                                   # small_dataset: 3 epochs of 32 steps
VALIDATED = [19, 39, 59, 79, 95]             # step indices: every 20 steps and the last


def val_job(tmp_path, dataset, name, **sections):
    sections = {"data": {"validation_path": str(dataset.with_name("small-test.h5"))},
                "train": {"validate_every_steps": EVERY},
                "checkpoint": {"every_steps": EVERY, "keep_last": 100},
                "output": {"jsonl": True, "progress_interval_s": 1000.0},
                "collectives": {"algorithm": "rd"}, **sections}
    return job_file(tmp_path / f"{name}.toml", dataset, tmp_path / name, **sections)


def validation_series(run_dir):
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        steps = f["step"][...]
        return steps, f["val_loss"][...], f["val_accuracy"][...]


def test_validation_matches_numpy_at_each_checkpoint_and_reaches_every_output(small_dataset, tmp_path):
    run = mpirun(2, "train", val_job(tmp_path, small_dataset, "run"), timeout=120)
    assert run.returncode == 0, run.output
    run_dir = tmp_path / "run"
    steps, val_loss, val_accuracy = validation_series(run_dir)
    assert np.array_equal(steps, np.arange(STEPS))
    assert np.flatnonzero(np.isfinite(val_loss)).tolist() == VALIDATED
    with h5py.File(small_dataset.with_name("small-test.h5"), "r") as f:
        X, y = f["X"][...].astype(np.float64), f["y"][...]
    for index in VALIDATED:
        params = read_params(run_dir / "ckpt" / f"step_{index + 1:08d}.h5").astype(np.float64)
        expected = reference.loss(params, (12, 16, 4), "relu", X, y, "classification") / len(y)
        outputs = reference.forward(params, (12, 16, 4), "relu", X)[-1]
        assert val_loss[index] == pytest.approx(expected, rel=1e-5)
        assert val_accuracy[index] == pytest.approx(np.mean(outputs.argmax(axis=1) == y), abs=1e-9)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    validated = [r["step"] for r in lines if r["type"] == "step" and r["val_loss"] is not None]
    assert validated == VALIDATED
    shown = [line for line in run.stdout.splitlines() if " val loss " in line]
    assert len(shown) == len(VALIDATED), run.stdout      # a progress line at each validation
    assert f"val loss {val_loss[95]:.4f} acc {100 * val_accuracy[95]:5.1f}%" in shown[-1]


@pytest.fixture(scope="module")
def undisturbed(small_dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("validation")
    run, _ = ulfm_train(4, val_job(base, small_dataset, "p4"), tmp_path=base)
    assert run.returncode == 0, run.output[-3000:]
    return base / "p4"


@pytest.mark.parametrize("victim,spares", [(1, 1), (0, 0)])
def test_a_rank_killed_inside_a_validation_leaves_each_validation_once(
        small_dataset, tmp_path, undisturbed, victim, spares):
    job = val_job(tmp_path, small_dataset, "run", fault={"spares": spares, "step_timeout_s": 30.0})
    run, _ = ulfm_train(4 + spares, job, f"rank={victim},step=39,at=validation", tmp_path=tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    assert "rank failure at step" in run.stdout and "during a validation" in run.stdout, run.output[-3000:]
    steps, val_loss, val_accuracy = validation_series(tmp_path / "run")
    _, expected_loss, expected_accuracy = validation_series(undisturbed)
    assert np.array_equal(steps, np.arange(STEPS)), "a step missing or recorded twice"
    assert np.flatnonzero(np.isfinite(val_loss)).tolist() == VALIDATED
    if spares:   # at full size the same bits as the undisturbed run, validations included
        assert np.array_equal(bits(val_loss.astype(np.float32)), bits(expected_loss.astype(np.float32)))
        assert np.array_equal(bits(read_params(tmp_path / "run" / "model.h5")),
                              bits(read_params(undisturbed / "model.h5")))
    else:        # on 3 ranks the sums run in another order
        np.testing.assert_allclose(val_loss[VALIDATED], expected_loss[VALIDATED], rtol=1e-4)
    np.testing.assert_allclose(val_accuracy[VALIDATED], expected_accuracy[VALIDATED], atol=1e-2)


@pytest.mark.parametrize("sections,message", [
    ({"train": {"validate_every_steps": 10}}, "only validate_every_steps is set"),
    ({"data": {"validation_path": "missing.h5"}, "train": {"validate_every_steps": 10}},
     "[data].validation_path: dataset file"),
])
def test_a_bad_validation_setting_is_one_line(small_dataset, tmp_path, sections, message):
    job = job_file(tmp_path / "job.toml", small_dataset, tmp_path / "run", **sections)
    check_rejected(mpirun(2, "train", job, timeout=60), tmp_path / "run", message)


def test_a_validation_set_of_another_shape_is_one_line(small_dataset, tmp_path):
    other = tmp_path / "other.h5"
    made = mpirun(1, "make-dataset", other, "--rows", "100", "--features", "5", timeout=60)
    assert made.returncode == 0, made.output
    job = job_file(tmp_path / "job.toml", small_dataset, tmp_path / "run",
                   data={"validation_path": str(other)}, train={"validate_every_steps": 10})
    check_rejected(mpirun(2, "train", job, timeout=60), tmp_path / "run",
                   "[data].validation_path")
