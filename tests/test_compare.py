"""``granger-mpi compare``: two real runs that differ in one key, side by side: the differing
key and each run's figures (checked against metrics.h5 and summary.json read with h5py and
json), the overlaid charts; a missing run directory is one line."""

import json

import h5py
import numpy as np

from conftest import granger, mpirun
from test_checkpoint import job_file


def test_compare_shows_what_differs_and_what_each_run_reached(small_dataset, tmp_path):
    runs = []
    for rate in (0.05, 0.2):
        run_dir = tmp_path / f"lr-{rate}"
        job = job_file(tmp_path / f"lr-{rate}.toml", small_dataset, run_dir,
                       data={"test_path": str(small_dataset.with_name("small-test.h5"))},
                       optimizer={"learning_rate": rate, "momentum": 0.9})
        assert mpirun(2, "train", job, timeout=120).returncode == 0
        runs.append(run_dir)
    shown = granger("compare", *runs, "--out", tmp_path / "charts")
    assert shown.returncode == 0, shown.output
    header, *rows = shown.stdout.splitlines()[:3]
    assert "[optimizer].learning_rate" in header and "[data].path" not in header
    assert rows[0].split()[1] == "0.05" and rows[1].split()[1] == "0.2"
    assert (tmp_path / "charts" / "loss.png").stat().st_size > 10_000
    assert (tmp_path / "charts" / "accuracy.png").exists()

    figures = json.loads(granger("compare", *runs, "--json").stdout)
    for run_dir, got in zip(runs, figures):
        with h5py.File(run_dir / "metrics.h5", "r") as f:
            loss = f["loss"][...]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert got["steps"] == loss.size == 96
        assert got["loss"] == np.mean(loss[-(96 // 50):])      # the last 2% of steps
        assert (got["test loss"], got["test acc"]) == (summary["test_loss"], summary["test_accuracy"])
        assert got["completed"] and got["failures"] == 0 and got["job"]["[optimizer].learning_rate"]


def test_compare_of_a_missing_run_is_one_line(tmp_path):
    run = granger("compare", tmp_path / "nowhere")
    assert run.returncode == 2 and "not found" in run.stderr and "Traceback" not in run.stderr, run.output
