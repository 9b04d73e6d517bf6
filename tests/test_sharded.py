"""Sharded optimizer state (ZeRO stage 1): same results, 1/P of the memory, resumable at any P."""

import re

import h5py
import numpy as np
import pytest

from conftest import mpirun, read_params, write_job

ADAM = {"name": "adam", "learning_rate": 0.01, "momentum": 0.0, "weight_decay": 1e-3, "clip_norm": 1.0}


def job(tmp_path, name, dataset, shard, **train):
    return write_job(tmp_path / f"{name}.toml", dataset=dataset, run_dir=tmp_path / name,
                     optimizer=ADAM, train={"epochs": 2, "shard_optimizer": shard, **train})


def relative(a, b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(scope="module")
def straight(small_dataset, tmp_path_factory):
    """Uninterrupted runs at P = 3, unsharded and sharded."""
    base = tmp_path_factory.mktemp("sharded")
    out = {}
    for name, shard in (("plain", False), ("sharded", True)):
        run = mpirun(3, "train", job(base, name, small_dataset, shard), timeout=120)
        assert run.returncode == 0, run.output
        out[name] = (run, read_params(base / name / "model.h5"))
    return out


def test_sharded_equals_unsharded_and_divides_optimizer_memory(straight):
    (plain_run, plain), (sharded_run, sharded) = straight["plain"], straight["sharded"]
    print(f"sharded vs unsharded at P=3: max relative difference {relative(sharded, plain):.2e}")
    assert relative(sharded, plain) <= 1e-5
    full = int(re.search(r"optimizer state: ([\d,]+) bytes per rank\n", plain_run.stdout)[1].replace(",", ""))
    per_rank = int(re.search(r"optimizer state: ([\d,]+) bytes per rank \(sharded over 3",
                             sharded_run.stdout)[1].replace(",", ""))
    print(f"optimizer state per rank: {per_rank:,} bytes sharded over 3 ranks, {full:,} unsharded")
    assert full / 3 - 64 <= per_rank <= full / 3 + 64   # rank 0's shard: the sizes differ by < 1 row


@pytest.mark.parametrize("before,after", [(3, 3), (2, 3)])
def test_sharded_checkpoint_resumes_at_the_same_and_another_p(straight, small_dataset, tmp_path, before, after):
    """Same P: bitwise identical to the run never stopped. Another P: the slabs are re-cut."""
    first = mpirun(before, "train", job(tmp_path, "run", small_dataset, True, max_steps=37), timeout=120)
    assert first.returncode == 0, first.output
    with h5py.File(tmp_path / "run" / "ckpt" / "step_00000037.h5", "r") as f:
        assert isinstance(f["optimizer/m"], h5py.Dataset) and f["optimizer/m"].ndim == 1
        assert np.count_nonzero(f["optimizer/v"][...]) > 0.9 * f["optimizer/v"].size   # every slab written
    second = mpirun(after, "train", job(tmp_path, "run", small_dataset, True), "--resume", "auto", timeout=120)
    assert second.returncode == 0, second.output
    assert "resuming from" in second.stdout
    resumed = read_params(tmp_path / "run" / "model.h5")
    if before == after:
        assert np.array_equal(resumed.view(np.uint32), straight["sharded"][1].view(np.uint32))
    else:
        print(f"sharded, stopped at P={before}, resumed at P={after}: max relative difference "
              f"{relative(resumed, straight['sharded'][1]):.2e}")
        assert relative(resumed, straight["sharded"][1]) <= 1e-5
