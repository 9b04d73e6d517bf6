"""End-to-end training under real mpirun: equivalence across P, bitwise repeatability."""

import h5py
import numpy as np
import pytest

from conftest import granger, mpirun, read_params, write_job


@pytest.fixture(scope="module")
def runs(reference_run):
    """The same job at P = 1, 2, 3, 4 (shared with other test files), and once more at P = 2."""
    return {**{f"p{n}": reference_run(n) for n in (1, 2, 3, 4)}, "p2again": reference_run(2, copy=1)}


def test_same_p_twice_is_bitwise_identical(runs):
    a = read_params(runs["p2"][1] / "model.h5")
    b = read_params(runs["p2again"][1] / "model.h5")
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("label", ["p2", "p3", "p4"])
def test_other_world_sizes_agree_with_one_rank(runs, label):
    """Same global batches at every P; only the summation order differs."""
    ref = read_params(runs["p1"][1] / "model.h5").astype(np.float64)
    got = read_params(runs[label][1] / "model.h5").astype(np.float64)
    relative = np.abs(got - ref).max() / np.abs(ref).max()
    print(f"{label}: max |params - params(P=1)| / max |params(P=1)| = {relative:.2e}")
    assert relative <= 1e-5


def test_training_learns_and_reports(runs):
    run, run_dir = runs["p2"]
    assert "test set" in run.stdout
    test_accuracy = float(run.stdout.split("test set")[1].split("accuracy")[1].split("%")[0])
    assert test_accuracy >= 90.0, run.stdout
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        steps = f["step"][...]
        loss = f["loss"][...]
        assert np.array_equal(steps, np.arange(2 * 32))   # 2 epochs x ceil(2000/64) steps
        assert loss[-8:].mean() < 0.5 * loss[:8].mean()
        assert np.all(f["grad_norm"][...] > 0) and np.all(f["samples_per_s"][...] > 0)
        assert np.all(f["learning_rate"][...] == pytest.approx(0.1))
    with h5py.File(run_dir / "model.h5", "r") as f:
        assert sorted(f["params"]) == ["W1", "W2", "b1", "b2"]
        assert f["params/W1"].shape == (12, 16) and f.attrs["step"] == 64
        assert '"global_batch": 64' in f.attrs["job"]
    assert (run_dir / "job.toml").read_text().startswith("[data]")


def test_evaluate_matches_training_report(runs, small_dataset):
    run, run_dir = runs["p3"]
    test_file = small_dataset.with_name("small-test.h5")
    reported = float(run.stdout.split("test set")[1].split("loss ")[1].split(",")[0])
    for ev in (granger("evaluate", run_dir / "model.h5", test_file),
               mpirun(2, "evaluate", run_dir / "model.h5", test_file)):
        assert ev.returncode == 0, ev.output
        loss = float(ev.stdout.split("loss ")[1].split()[0])
        assert loss == pytest.approx(reported, rel=1e-5), ev.stdout


def test_regression_with_mse_output(tmp_path):
    data = tmp_path / "reg.h5"
    assert granger("make-dataset", data, "--task", "regression", "--rows", "1500", "--features", "6",
                   "--seed", "2").returncode == 0
    job = write_job(tmp_path / "job.toml", dataset=data, run_dir=tmp_path / "run",
                    model={"kind": "linear", "hidden": []}, train={"epochs": 6},
                    optimizer={"learning_rate": 0.05})
    run = mpirun(2, "train", job, timeout=120)
    assert run.returncode == 0, run.output
    with h5py.File(tmp_path / "run" / "metrics.h5", "r") as f:
        loss = f["loss"][...]
        assert np.isnan(f["accuracy"][...]).all()
    # Targets carry noise 0.1, so the best half squared error is about 0.005.
    assert loss[-10:].mean() < 0.02 < loss[0]


ALGORITHM_RUNS = [("native", 3, None), ("ring", 3, None), ("rhd", 3, None), ("rd", 3, None),
                  ("shm", 3, None), ("native", 4, None), ("hierarchical", 4, 2)]


@pytest.fixture(scope="module")
def algorithm_runs(small_dataset, tmp_path_factory):
    """Each algorithm trained twice (native, the reference, once); hierarchical on two
    emulated nodes of 2 ranks."""
    base = tmp_path_factory.mktemp("algorithms")
    params = {}
    for algorithm, ranks, per_node in ALGORITHM_RUNS:
        for attempt in (1,) if algorithm == "native" else (1, 2):
            label = f"{algorithm}-p{ranks}-{attempt}"
            collectives = {"algorithm": algorithm}
            if per_node:
                collectives["ranks_per_node"] = per_node
            job = write_job(base / f"{label}.toml", dataset=small_dataset, run_dir=base / label,
                            collectives=collectives, train={"epochs": 1})
            run = mpirun(ranks, "train", job, timeout=180)
            assert run.returncode == 0, run.output
            params[(algorithm, ranks, attempt)] = read_params(base / label / "model.h5")
    return params


@pytest.mark.parametrize("algorithm,ranks,per_node", [r for r in ALGORITHM_RUNS if r[0] != "native"])
def test_algorithm_matches_native_and_repeats_bitwise(algorithm_runs, algorithm, ranks, per_node):
    first = algorithm_runs[(algorithm, ranks, 1)]
    second = algorithm_runs[(algorithm, ranks, 2)]
    assert np.array_equal(first.view(np.uint32), second.view(np.uint32))
    native = algorithm_runs[("native", ranks, 1)].astype(np.float64)
    relative = np.abs(first - native).max() / np.abs(native).max()
    print(f"{algorithm} at P={ranks}: max relative difference from native {relative:.2e}")
    assert relative <= 1e-5
