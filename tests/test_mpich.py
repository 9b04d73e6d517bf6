"""The MPICH family: the same code under Debian's MPICH (``scripts/bootstrap --mpi mpich``,
``.venv-mpich``, launched by ``mpiexec.mpich``): doctor, the hand-written collectives against
MPI_Allreduce at P = 2..5, parallel make-dataset, training bitwise at the same P and within
1e-5 across P, a rank killed in restart mode and the run resumed, and checkpoints carried
between MPICH and Open MPI both ways, bitwise."""

import os

import h5py
import numpy as np
import pytest

from conftest import GRANGER, MPIRUN, ROOT, read_params, run_command
from test_checkpoint import bits, job_file

VENV = ROOT / ".venv-mpich"
MPICH_PYTHON = VENV / "bin" / "python"
pytestmark = pytest.mark.skipif(not MPICH_PYTHON.exists(),
                                reason="no .venv-mpich: run scripts/bootstrap --mpi mpich")
# The MPICH venv's programs first; no Open MPI variables (they mean nothing to MPICH).
ENV = {"PATH": f"{VENV / 'bin'}:{os.environ['PATH']}"}
PROGRAMS = ROOT / "tests" / "programs"
STEPS = 96


def mpich(n, *args, timeout=120):
    """``mpiexec.mpich -n n granger-mpi ARGS`` with the MPICH venv's Python."""
    return run_command(["mpiexec.mpich", "-n", str(n), MPICH_PYTHON, "-P", "-m", "granger_mpi", *args],
                       timeout, env=ENV)


def openmpi(n, *args, timeout=120):
    return run_command([*MPIRUN, "-n", str(n), *GRANGER, *args], timeout)


def test_doctor_names_mpich_and_its_parallel_hdf5():
    run = mpich(2, "doctor")
    assert run.returncode == 0, run.output
    assert "MPI library: MPICH" in run.stdout and "libmpich.so.12" in run.stdout, run.stdout
    assert "parallel (mpio driver)" in run.stdout and "libhdf5_mpich" in run.stdout, run.stdout
    assert "sum over ranks 3, expected 3" in run.stdout
    assert "ULFM fault tolerance" in run.stdout       # what the probe found, either way


@pytest.mark.parametrize("ranks", [2, 3, 4, 5])
def test_every_algorithm_matches_mpi_allreduce_under_mpich(ranks):
    run = run_command(["mpiexec.mpich", "-n", str(ranks), MPICH_PYTHON, PROGRAMS / "check_collectives.py",
                       *(["2"] if ranks >= 4 else [])], timeout=240, env=ENV)
    assert run.returncode == 0, run.output
    assert f"checked P={ranks}" in run.stdout and ": 0 failure(s)" in run.stdout, run.output


def test_parallel_make_dataset_writes_the_same_file_as_under_open_mpi(small_dataset, tmp_path):
    path = tmp_path / "small.h5"
    run = mpich(2, "make-dataset", path, "--rows", "2000", "--test-rows", "500", "--features", "12",
                "--classes", "4", "--separation", "1.5", "--seed", "5")
    assert run.returncode == 0, run.output
    for name in ("small.h5", "small-test.h5"):
        with h5py.File(tmp_path / name, "r") as ours, h5py.File(small_dataset.with_name(name), "r") as theirs:
            for key in ("X", "y"):
                assert np.array_equal(ours[key][...], theirs[key][...]), f"{name}:/{key}"


def job(tmp_path, dataset, name, **train):
    return job_file(tmp_path / f"{name}.toml", dataset, tmp_path / name,
                    train={"epochs": 3, **train}, collectives={"algorithm": "ring"},
                    checkpoint={"every_steps": 20})


@pytest.fixture(scope="module")
def straight(small_dataset, tmp_path_factory):
    """The job at P = 1 and P = 3 under MPICH, and at P = 3 under Open MPI."""
    base = tmp_path_factory.mktemp("mpich")
    out = {}
    for label, launch, n in (("mpich1", mpich, 1), ("mpich3", mpich, 3), ("openmpi3", openmpi, 3)):
        run = launch(n, "train", job(base, small_dataset, label))
        assert run.returncode == 0, run.output
        out[label] = read_params(base / label / "model.h5")
    return out


def test_training_is_bitwise_at_the_same_p_and_agrees_across_p(straight, small_dataset, tmp_path):
    again = mpich(3, "train", job(tmp_path, small_dataset, "again"))
    assert again.returncode == 0, again.output
    assert np.array_equal(bits(read_params(tmp_path / "again" / "model.h5")), bits(straight["mpich3"]))
    ref = straight["mpich1"].astype(np.float64)
    assert np.abs(straight["mpich3"] - ref).max() / np.abs(ref).max() <= 1e-5
    # the ring is ours, point to point: the same sums in the same order under either MPI
    assert np.array_equal(bits(straight["mpich3"]), bits(straight["openmpi3"]))


@pytest.mark.parametrize("first,then", [(mpich, openmpi), (openmpi, mpich)],
                         ids=["MPICH to Open MPI", "Open MPI to MPICH"])
def test_a_checkpoint_resumes_under_the_other_mpi_bitwise(straight, small_dataset, tmp_path, first, then):
    stopped = first(3, "train", job(tmp_path, small_dataset, "run", max_steps=37))
    assert stopped.returncode == 0, stopped.output
    resumed = then(3, "train", job(tmp_path, small_dataset, "run"), "--resume", "auto")
    assert resumed.returncode == 0, resumed.output
    assert "resuming from" in resumed.stdout and "step 37" in resumed.stdout
    assert np.array_equal(bits(read_params(tmp_path / "run" / "model.h5")), bits(straight["mpich3"]))


def test_a_killed_rank_in_restart_mode_resumes_from_its_checkpoint(straight, small_dataset, tmp_path):
    path = job(tmp_path, small_dataset, "run")
    killed = mpich(3, "train", path, "--inject-failure", "rank=1,step=50,mode=kill9")
    assert killed.returncode != 0, killed.output
    assert (tmp_path / "run" / "ckpt" / "step_00000040.h5").exists()
    assert not (tmp_path / "run" / "COMPLETE").exists()
    resumed = mpich(3, "train", path, "--resume", "auto")
    assert resumed.returncode == 0, resumed.output
    assert "resuming from" in resumed.stdout and "step 40" in resumed.stdout
    assert np.array_equal(bits(read_params(tmp_path / "run" / "model.h5")), bits(straight["mpich3"]))
    with h5py.File(tmp_path / "run" / "metrics.h5", "r") as f:
        assert np.array_equal(f["step"][...], np.arange(STEPS))
