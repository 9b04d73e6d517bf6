"""Optimizers in training: schedules, clipping, accumulation, Adam checkpoints, new models."""

import math
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from granger_mpi.model import models, optimizer
from granger_mpi.model.models import Model

from conftest import blas_thread_counts, granger, mpirun, read_params, write_job


def cfg(**overrides):
    base = dict(name="sgd", learning_rate=0.1, momentum=0.0, nesterov=False, weight_decay=0.0,
                beta1=0.9, beta2=0.999, eps=1e-8, schedule="constant", warmup_steps=0, step_size=None,
                gamma=0.1, min_learning_rate=0.0, scale_with_batch=False, base_batch=256,
                clip_norm=None, clip_value=None)
    base.update(overrides)
    return SimpleNamespace(**base)


def rates(config, total=100, batch=256):
    return [optimizer.learning_rate(config, s, total, batch) for s in range(total)]


def test_learning_rate_schedules():
    assert rates(cfg()) == [0.1] * 100
    step = rates(cfg(schedule="step", step_size=30, gamma=0.5))
    assert step[0] == step[29] == 0.1 and step[30] == 0.05 and step[99] == pytest.approx(0.0125)
    warm = rates(cfg(warmup_steps=4))
    assert warm[:5] == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])
    cosine = rates(cfg(schedule="cosine", warmup_steps=10, min_learning_rate=0.001))
    assert cosine[9] == pytest.approx(0.1) and cosine[10] == pytest.approx(0.1)
    assert cosine[-1] == pytest.approx(0.001)
    middle = 10 + (99 - 10) / 2
    assert optimizer.learning_rate(cfg(schedule="cosine", warmup_steps=10, min_learning_rate=0.001),
                                   middle, 100, 256) == pytest.approx(0.0505)
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:]))
    assert rates(cfg(scale_with_batch=True), batch=1024)[0] == pytest.approx(0.4)


def test_clipping_by_global_norm_and_by_value():
    rng = np.random.default_rng(0)
    grad = rng.normal(size=100).astype(np.float32) * 3
    norm = float(np.linalg.norm(grad.astype(np.float64)))
    opt = optimizer.Optimizer(cfg(clip_norm=1.0), 100, total_steps=1, global_batch=1)
    clipped = grad.copy()
    assert opt.clip(clipped) == pytest.approx(norm, rel=1e-12)
    np.testing.assert_allclose(clipped, grad * (1.0 / (norm + 1e-6)), rtol=1e-6)
    assert np.linalg.norm(clipped) == pytest.approx(1.0, rel=1e-5)
    small = grad / np.float32(10 * norm)
    untouched = small.copy()
    opt.clip(untouched)
    assert np.array_equal(untouched, small)     # below the limit: not scaled at all
    by_value = optimizer.Optimizer(cfg(clip_value=0.5), 100, total_steps=1, global_batch=1)
    clipped = grad.copy()
    by_value.clip(clipped)
    assert np.array_equal(clipped, np.clip(grad, -0.5, 0.5))


def test_optimizer_state_slots_are_views_of_one_buffer():
    opt = optimizer.Optimizer(cfg(name="adam"), 10, total_steps=1, global_batch=1)
    assert opt.slots == ("m", "v") and opt.state.shape == (20,)
    opt.slot("v")[:] = 1
    assert opt.state[10:].sum() == 10 and opt.state[:10].sum() == 0


@pytest.mark.parametrize("kind,sizes,activation", [("mlp", (6, 9, 4), "gelu"), ("logistic", (6, 1), "relu")])
def test_micro_batches_sum_to_the_whole_batch(kind, sizes, activation):
    rng = np.random.default_rng(1)
    model = Model(kind, sizes, activation, "classification")
    params = model.init_params(1, np.float64)
    X = rng.normal(size=(23, sizes[0]))
    y = rng.integers(0, 2 if kind == "logistic" else sizes[-1], 23).astype(np.int32)
    whole = np.empty_like(params)
    loss, correct = model.loss_grad(params, X, y, 1 / 23, whole)
    for pieces in (2, 3, 7, 40):
        grad, scratch = np.empty_like(params), np.empty_like(params)
        got = models.loss_grad_in_micro_batches(model, params, X, y, 1 / 23, grad, pieces, scratch)
        np.testing.assert_allclose(grad, whole, rtol=1e-12, atol=1e-15)
        assert got[0] == pytest.approx(loss, rel=1e-12) and got[1] == correct


def job(tmp_path, name, dataset, **sections):
    return write_job(tmp_path / f"{name}.toml", dataset=dataset, run_dir=tmp_path / name, **sections)


ADAM = {"name": "adam", "learning_rate": 0.01, "momentum": 0.0, "weight_decay": 1e-3}


def test_adam_stop_and_resume_is_bitwise_identical(small_dataset, tmp_path):
    """m, v and the step count survive a checkpoint: resumed == never stopped, bit for bit.

    (A step schedule: a cosine one ends at the run's last step, which max_steps moves.)
    """
    sections = dict(optimizer={**ADAM, "schedule": "step", "step_size": 20, "gamma": 0.5,
                               "warmup_steps": 5, "clip_norm": 2.0},
                    train={"epochs": 2})
    straight = mpirun(2, "train", job(tmp_path, "straight", small_dataset, **sections), timeout=120)
    assert straight.returncode == 0, straight.output
    run_dir = tmp_path / "stopped"
    first = mpirun(2, "train", job(tmp_path, "stopped", small_dataset,
                                   optimizer=sections["optimizer"], train={"epochs": 2, "max_steps": 37}),
                   timeout=120)
    assert first.returncode == 0, first.output
    with h5py.File(run_dir / "ckpt" / "step_00000037.h5", "r") as f:
        assert sorted(f["optimizer"]) == ["m", "v"] and f.attrs["step"] == 37
        assert np.abs(f["optimizer/v/W1"][...]).sum() > 0
    second = mpirun(2, "train", job(tmp_path, "stopped", small_dataset, **sections),
                    "--resume", "auto", timeout=120)
    assert second.returncode == 0, second.output
    assert "resuming from" in second.stdout
    a, b = read_params(run_dir / "model.h5"), read_params(tmp_path / "straight" / "model.h5")
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    # A checkpoint of Adam is refused by an SGD job, naming both state sets.
    other = mpirun(2, "train", job(tmp_path, "stopped", small_dataset, train={"epochs": 2}),
                   "--resume", "auto", timeout=120)
    assert other.returncode == 2, other.output
    assert "holds optimizer state m, v" in other.stderr and "needs velocity" in other.stderr


def test_accumulation_matches_one_pass_and_options_train(small_dataset, reference_run, tmp_path):
    """accumulation_steps changes only the order of sums; Nesterov, AdamW, GELU, step decay
    and clipping by value all train to a good test accuracy."""
    test_path = str(small_dataset.with_name("small-test.h5"))
    plain_run, plain_dir = reference_run(2)     # the default job: one pass per step
    runs = {
        "accumulated": {"train": {"epochs": 2, "accumulation_steps": 3}},
        "nesterov": {"optimizer": {"nesterov": True, "schedule": "step", "step_size": 40, "gamma": 0.5,
                                   "clip_value": 1.0}},
        "adamw": {"optimizer": {**ADAM, "name": "adamw", "weight_decay": 0.01, "scale_with_batch": True,
                                "base_batch": 128}, "model": {"activation": "gelu", "hidden": [16, 8]}},
    }
    accuracy = {"plain": float(plain_run.stdout.split("test set")[1].split("accuracy")[1].split("%")[0])}
    for name, sections in runs.items():
        run = mpirun(2, "train", job(tmp_path, name, small_dataset, data={"test_path": test_path},
                                     **sections), timeout=120)
        assert run.returncode == 0, run.output
        accuracy[name] = float(run.stdout.split("test set")[1].split("accuracy")[1].split("%")[0])
    plain = read_params(plain_dir / "model.h5").astype(np.float64)
    accumulated = read_params(tmp_path / "accumulated" / "model.h5").astype(np.float64)
    relative = np.abs(accumulated - plain).max() / np.abs(plain).max()
    print(f"accumulation_steps = 3 vs 1: max relative difference {relative:.2e}; accuracies {accuracy}")
    assert relative <= 1e-5
    assert min(accuracy.values()) >= 90.0, accuracy
    with h5py.File(tmp_path / "nesterov" / "metrics.h5", "r") as f:
        lr = f["learning_rate"][...]
        assert lr[0] == pytest.approx(0.1) and lr[40] == pytest.approx(0.05)
    with h5py.File(tmp_path / "adamw" / "metrics.h5", "r") as f:
        assert f["learning_rate"][0] == pytest.approx(0.01 * 64 / 128)


def test_logistic_regression_on_two_classes(tmp_path):
    data = tmp_path / "two.h5"
    made = granger("make-dataset", data, "--rows", "1200", "--test-rows", "300", "--features", "5",
                   "--classes", "2", "--separation", "2", "--seed", "4")
    assert made.returncode == 0, made.output
    run = mpirun(2, "train", job(tmp_path, "logistic", data, model={"kind": "logistic", "hidden": []},
                                 data={"test_path": str(tmp_path / "two-test.h5")}), timeout=120)
    assert run.returncode == 0, run.output
    accuracy = float(run.stdout.split("test set")[1].split("accuracy")[1].split("%")[0])
    assert accuracy >= 85.0, run.stdout
    with h5py.File(tmp_path / "logistic" / "model.h5", "r") as f:
        assert f["params/W1"].shape == (5, 1)
    evaluated = granger("evaluate", tmp_path / "logistic" / "model.h5", tmp_path / "two-test.h5")
    assert evaluated.returncode == 0, evaluated.output
    assert f"accuracy {accuracy:.2f}%" in evaluated.stdout
    assert not math.isnan(accuracy)


def test_threads_per_rank_default_shares_the_cores_and_the_setting_wins(small_dataset, tmp_path):
    from granger_mpi.mpi.threads import default_threads
    assert [default_threads(cores, ranks) for cores, ranks in ((2, 2), (2, 4), (16, 4), (8, 1))] == [1, 1, 4, 8]
    import os
    cores = len(os.sched_getaffinity(0))
    shared = mpirun(2, "train", job(tmp_path, "shared", small_dataset, train={"max_steps": 2}))
    assert shared.returncode == 0, shared.output
    assert f"{max(1, cores // 2)} thread(s) per rank" in shared.stdout
    assert set(blas_thread_counts(shared.stdout)) == {max(1, cores // 2)}, shared.stdout   # BLAS told too
    alone = granger("train", job(tmp_path, "alone", small_dataset, train={"max_steps": 2, "threads_per_rank": 2}))
    assert alone.returncode == 0, alone.output
    assert "2 thread(s) per rank" in alone.stdout


@pytest.mark.parametrize("files,cpus", [
    ({"cpu.max": "200000 100000\n"}, 2), ({"cpu.max": "150000 100000\n"}, 2),
    ({"cpu.max": "max 100000\n"}, None), ({}, None),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None)])
def test_the_cgroup_cpu_quota_caps_the_usable_cpus(tmp_path, files, cpus):
    from granger_mpi.mpi.threads import cgroup_cpus
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpus(tmp_path) == cpus
