"""A model of the user's own (``[model].kind = "package.module:factory"``), the example in
``jobs/models/widedeep.py``: its gradient against finite differences (and a wrong one caught),
then the guarantees of the built-in models: at P = 4 the same bits whether the run goes
straight through, stops and resumes, or loses a rank to SIGKILL under ULFM with a spare."""

import sys

import h5py
import numpy as np
import pytest

from conftest import ROOT, mpirun, write_job
from test_checkpoint import bits
from test_fault import assert_every_sample_once, ulfm_train
from test_bad_inputs import check_rejected
from granger_mpi.model import custom

MODELS = ROOT / "jobs" / "models"
ENV = {"PYTHONPATH": str(MODELS)}
P = 4


@pytest.fixture(scope="module")
def widedeep():
    sys.path.insert(0, str(MODELS))
    try:
        import widedeep
        yield widedeep
    finally:
        sys.path.remove(str(MODELS))


def test_the_example_s_gradient_matches_finite_differences_and_a_wrong_one_is_caught(widedeep):
    assert widedeep.check() < 1e-5

    class Wrong(widedeep.WideDeep):
        def loss_grad(self, params, X, y, scale, grad):
            out = super().loss_grad(params, X, y, scale, grad)
            self.layout.views(grad)["b1"][3] *= 1.01     # one element 1% off
            return out

    rng = np.random.default_rng(0)
    model = Wrong(16, kind="wrong:make", n_features=12, n_outputs=4, task="classification",
                  options={})
    X, y = rng.normal(size=(64, 12)), rng.integers(0, 4, 64).astype(np.int32)
    # every coordinate, so that the wrong one is among them
    with pytest.raises(AssertionError, match="differs from finite differences"):
        custom.check_gradient(model, X, y, coordinates=model.layout.size)


def job(tmp_path, dataset, name, **sections):
    sections = {"model": {"kind": "widedeep:make", "hidden": None, "options": {"hidden": 24}},
                "train": {"epochs": 3}, "collectives": {"algorithm": "rd"},
                "checkpoint": {"every_steps": 20}, "fault": {"step_timeout_s": 30.0}, **sections}
    return write_job(tmp_path / f"{name}.toml", dataset=dataset, run_dir=tmp_path / name, **sections)


def params(run_dir):
    """The model file's parameters, read with h5py, in name order."""
    with h5py.File(run_dir / "model.h5", "r") as f:
        return np.concatenate([f["params"][name][...].ravel() for name in sorted(f["params"])])


@pytest.fixture(scope="module")
def undisturbed(small_dataset, tmp_path_factory):
    base = tmp_path_factory.mktemp("custom")
    run, _ = ulfm_train(P, job(base, small_dataset, "straight"), tmp_path=base, env=ENV)
    assert run.returncode == 0, run.output[-3000:]
    assert "training widedeep:make" in run.stdout
    return base / "straight"


def test_a_custom_model_evaluates_and_resumes_bitwise(small_dataset, tmp_path, undisturbed):
    test_set = small_dataset.with_name("small-test.h5")
    evaluated = mpirun(2, "evaluate", undisturbed / "model.h5", test_set, timeout=120, env=ENV)
    assert evaluated.returncode == 0, evaluated.output
    accuracy = float(evaluated.stdout.split("accuracy ")[1].rstrip("%\n"))
    assert accuracy > 80, evaluated.stdout
    # without its module a model file cannot be read: one line naming what to do
    missing = mpirun(1, "evaluate", undisturbed / "model.h5", test_set, timeout=60)
    assert missing.returncode == 2 and "put its directory on PYTHONPATH" in missing.stderr, missing.output

    first = mpirun(P, "train", job(tmp_path, small_dataset, "run", train={"epochs": 3, "max_steps": 37}),
                   timeout=120, env=ENV)
    assert first.returncode == 0, first.output
    second = mpirun(P, "train", job(tmp_path, small_dataset, "run"), "--resume", "auto",
                    timeout=120, env=ENV)
    assert second.returncode == 0, second.output
    assert "resuming from" in second.stdout
    assert np.array_equal(bits(params(tmp_path / "run")), bits(params(undisturbed)))


def test_a_custom_model_survives_a_sigkill_under_ulfm_bitwise_with_a_spare(
        small_dataset, tmp_path, undisturbed):
    spare = job(tmp_path, small_dataset, "spare", fault={"spares": 1, "step_timeout_s": 30.0})
    run, log_dir = ulfm_train(P + 1, spare, "rank=2,step=33,at=allreduce", tmp_path=tmp_path, env=ENV)
    assert run.returncode == 0, run.output[-3000:]
    assert "spare world rank 4 takes the place of world rank 2" in run.stdout, run.output[-3000:]
    assert_every_sample_once(log_dir, 3)
    assert np.array_equal(bits(params(tmp_path / "spare")), bits(params(undisturbed)))


@pytest.mark.parametrize("model,message", [
    ({"kind": "nosuch:make"}, "No module named 'nosuch'"),
    ({"kind": "widedeep:nosuch"}, "module 'widedeep' has no 'nosuch'"),
    ({"kind": "widedeep:make", "options": {"hidden": -1}}, "options.hidden must be a positive"),
    ({"kind": "widedeep:make", "options": {"width": 3}}, "unexpected keyword argument 'width'"),
    ({"kind": "mlp", "hidden": [8], "options": {"hidden": 3}}, "[model].options are for a model"),
    ({"kind": "resnet"}, "[model].kind must be one of"),
])
def test_a_bad_custom_model_is_one_line(small_dataset, tmp_path, model, message):
    job_path = write_job(tmp_path / "job.toml", dataset=small_dataset, run_dir=tmp_path / "run",
                         model={"hidden": None, **model})
    check_rejected(mpirun(2, "train", job_path, timeout=60, env=ENV), tmp_path / "run", message)
