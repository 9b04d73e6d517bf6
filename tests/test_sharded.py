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


@pytest.mark.parametrize("before,after,sharded_before,sharded_after",
                         [(3, 3, True, True), (2, 3, True, True), (2, 3, False, True), (3, 2, True, False)])
def test_sharded_checkpoint_resumes_at_the_same_and_another_p(straight, small_dataset, tmp_path, before, after,
                                                             sharded_before, sharded_after):
    """Same P: bitwise identical to the run never stopped. Another P, or a change between
    sharded and unsharded: the state is re-cut (slabs or named tensors, either way)."""
    first = mpirun(before, "train", job(tmp_path, "run", small_dataset, sharded_before, max_steps=37),
                   timeout=120)
    assert first.returncode == 0, first.output
    with h5py.File(tmp_path / "run" / "ckpt" / "step_00000037.h5", "r") as f:
        if sharded_before:
            assert isinstance(f["optimizer/m"], h5py.Dataset) and f["optimizer/m"].ndim == 1
            assert np.count_nonzero(f["optimizer/v"][...]) > 0.9 * f["optimizer/v"].size   # every slab
        else:
            assert isinstance(f["optimizer/m"], h5py.Group) and "W1" in f["optimizer/m"]
    second = mpirun(after, "train", job(tmp_path, "run", small_dataset, sharded_after), "--resume", "auto",
                    timeout=120)
    assert second.returncode == 0, second.output
    assert "resuming from" in second.stdout
    resumed = read_params(tmp_path / "run" / "model.h5")
    if (before, sharded_before) == (after, sharded_after):
        assert np.array_equal(resumed.view(np.uint32), straight["sharded"][1].view(np.uint32))
    else:
        print(f"stopped at P={before} ({'sharded' if sharded_before else 'unsharded'}), resumed at "
              f"P={after} ({'sharded' if sharded_after else 'unsharded'}): max relative difference "
              f"{relative(resumed, straight['sharded'][1]):.2e}")
        assert relative(resumed, straight["sharded"][1]) <= 1e-5


def test_shard_reads_check_every_checksum_in_bounded_chunks(tmp_path, monkeypatch):
    from granger_mpi import checkpoint
    from granger_mpi.checkpoint import format as checkpoint_file
    from granger_mpi.model.models import Model
    model = Model("mlp", (5, 4, 3), "relu", "classification")
    n = model.layout.size
    data = np.arange(n, dtype=np.float32)
    monkeypatch.setattr(checkpoint_file, "READ_CHUNK_ELEMENTS", 7)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f["flat"] = data
        f["flat"].attrs["crc32"] = checkpoint_file.crc32(data)
        for name, view in model.layout.views(data.copy()).items():
            f[f"named/{name}"] = view
            f[f"named/{name}"].attrs["crc32"] = checkpoint_file.crc32(view)
        f["bad"] = data
        f["bad"].attrs["crc32"] = checkpoint_file.crc32(data) ^ 1
    with h5py.File(tmp_path / "c.h5", "r") as f:
        listed = {name: {"crc32": int(f[name].attrs["crc32"])} for name in ["flat", "bad"] +
                  [f"named/{name}" for name in f["named"]]}
        for group in ("flat", "named"):
            for lo, hi in ((0, n), (3, 30), (29, n), (10, 10)):
                out = np.full(hi - lo, -1, np.float32)
                checkpoint_file._read_part(f, "c.h5", listed, group, model, out, lo, hi)
                assert np.array_equal(out, data[lo:hi]), (group, lo, hi)
        with pytest.raises(checkpoint.CheckpointError, match="/bad: checksum mismatch"):
            checkpoint_file._read_part(f, "c.h5", listed, "bad", model, np.empty(5, np.float32), 3, 8)
