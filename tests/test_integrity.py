"""Dataset checksums: written by make-dataset and import-dataset, added by ``dataset
checksum``, checked by ``dataset verify`` and by every read of training."""

import shutil

import h5py
import numpy as np
import pytest

from conftest import granger, mpirun, write_job
from granger_mpi.data import integrity


def flip_a_byte(path, row, column=3):
    """Flip one bit of ``/X[row, column]`` in the file's bytes, as a disk or a copy would
    (uncompressed ``/X`` only: contiguous, or chunked by rows as make-dataset writes it)."""
    with h5py.File(path, "r") as f:
        X = f["X"]
        within = (row * X.shape[1] + column) * X.dtype.itemsize
        if X.chunks is None:
            offset = X.id.get_offset() + within
        else:
            first = row // X.chunks[0] * X.chunks[0]
            offset = X.id.get_chunk_info_by_coord((first, 0)).byte_offset + \
                ((row - first) * X.shape[1] + column) * X.dtype.itemsize
    with open(path, "r+b") as raw:
        raw.seek(offset + 1)
        byte = raw.read(1)[0]
        raw.seek(offset + 1)
        raw.write(bytes([byte ^ 0x10]))


def block_of(path, row):
    with h5py.File(path) as f:
        block = int(f[integrity.GROUP].attrs["block_rows"])
    return row // block * block, min(2000, (row // block + 1) * block)


@pytest.fixture
def damaged(small_dataset, tmp_path):
    path = tmp_path / "damaged.h5"
    shutil.copy(small_dataset, path)
    flip_a_byte(path, 1500)
    return path


def test_made_and_imported_datasets_carry_checksums_that_verify(small_dataset, tmp_path):
    run = mpirun(2, "dataset", "verify", small_dataset)
    assert run.returncode == 0, run.output
    assert "2000 rows" not in run.stdout and " blocks intact" in run.stdout
    np.savez(tmp_path / "d.npz", X=np.arange(60.0).reshape(20, 3), y=np.arange(20) % 2)
    assert granger("import-dataset", tmp_path / "d.npz", tmp_path / "d.h5").returncode == 0
    run = granger("dataset", "verify", tmp_path / "d.h5")
    assert run.returncode == 0 and "1 of 1 blocks intact" in run.stdout, run.output


def test_verify_names_the_damaged_block_under_mpirun(damaged):
    lo, hi = block_of(damaged, 1500)
    run = mpirun(3, "dataset", "verify", damaged)
    assert run.returncode == 1, run.output
    assert f"/X rows [{lo}, {hi}) do not match their checksum" in run.stderr, run.output
    assert "1 damaged" in run.stdout


def test_checksum_adds_them_to_a_file_made_elsewhere(tmp_path):
    """Over the values, not the storage: a chunked, compressed float64 file made by h5py
    gets checksums that verify, and a changed value is found."""
    path = tmp_path / "elsewhere.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("X", data=np.random.default_rng(1).normal(size=(5000, 7)),
                         chunks=(300, 7), compression="gzip")
        f["y"] = np.arange(5000) % 3
    run = granger("dataset", "verify", path)
    assert run.returncode == 2 and "has no checksums" in run.stderr, run.output
    run = mpirun(2, "dataset", "checksum", path)
    assert run.returncode == 0, run.output
    assert granger("dataset", "verify", path).returncode == 0
    with h5py.File(path, "r+") as f:     # compressed: change the value through HDF5
        f["X"][4321, 0] += 1
    run = granger("dataset", "verify", path)
    assert run.returncode == 1 and "/X rows [" in run.stderr, run.output


def test_training_on_a_damaged_file_stops_every_rank_and_saves_nothing(damaged, tmp_path):
    lo, hi = block_of(damaged, 1500)
    job = write_job(tmp_path / "job.toml", dataset=damaged, run_dir=tmp_path / "run",
                    train={"epochs": 1})
    run = mpirun(3, "train", job, timeout=90)
    assert run.returncode == 2, run.output
    lines = [line for line in run.stderr.splitlines() if line.startswith("granger-mpi: error")]
    assert len(lines) == 1 and f"{damaged}: /X rows [{lo}, {hi}) do not match" in lines[0], run.output
    assert not (tmp_path / "run" / "model.h5").exists()
    assert not list((tmp_path / "run").glob("ckpt/step_*.h5"))


def test_evaluate_names_a_damaged_block_on_every_rank(damaged, reference_run):
    lo, hi = block_of(damaged, 1500)
    _, run_dir = reference_run(2)
    run = mpirun(3, "evaluate", run_dir / "model.h5", damaged, timeout=90)
    assert run.returncode == 2, run.output
    lines = [line for line in run.stderr.splitlines() if line.startswith("granger-mpi: error")]
    assert len(lines) == 1 and f"/X rows [{lo}, {hi}) do not match" in lines[0], run.output
