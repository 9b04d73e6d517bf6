"""granger-mpi as a user installs it: the sdist and the wheel built from it carry every module
and the package data, and the wheel, installed (not editable) into a fresh environment, passes
``doctor`` and trains on 2 ranks from a directory outside the repository.

The fresh environment reuses the dependencies this checkout already built (the parallel h5py
above all) through a folder of links to them, without granger-mpi's own editable install. The
MPI comes from PATH, LD_LIBRARY_PATH and MPI4PY_LIBMPI, as a site's ``module load`` would give it.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, run_command, write_job

VERSION = __import__("granger_mpi").__version__
SOURCES = ("granger_mpi", "kernels", "setup.cfg", "pyproject.toml", "README.md")


def build(out):
    """The sdist of a copy of the sources, then the wheel built from the unpacked sdist (what
    ``python -m build`` does), so that the wheel holds only what the sdist carries."""
    src = out / "src"
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns(
                "__pycache__", "*.nbi", "*.nbc"))
        else:
            shutil.copy2(path, src / name)
    dist = out / "dist"
    subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta; "
                    "build_meta.build_sdist(sys.argv[1])", str(dist)],
                   cwd=src, check=True, capture_output=True, timeout=120)
    sdist = dist / f"granger_mpi-{VERSION}.tar.gz"
    with tarfile.open(sdist) as tar:
        tar.extractall(out / "unpacked", filter="data")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(dist), str(out / "unpacked" / f"granger_mpi-{VERSION}")],
                   check=True, capture_output=True, timeout=120)
    return sdist, dist / f"granger_mpi-{VERSION}-py3-none-any.whl"


def modules():
    """Every file the package must carry, as its path inside the installed package."""
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "granger_mpi").rglob("*.py")}
    files |= {"granger_mpi/" + p.relative_to(ROOT).as_posix()
              for p in (ROOT / "kernels").rglob("*.py")}
    return files | {"granger_mpi/collectives/calibration.json"}


def fresh_environment(path):
    """A venv whose only granger-mpi is the one installed into it, its dependencies linked from
    this checkout's venv."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=60)
    deps = path / "deps"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(("granger_mpi", "__editable__")) and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    site = Path(subprocess.run([path / "bin" / "python", "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps.pth").write_text(f"{deps}\n")
    return path / "bin" / "python"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(tmp_path_factory.mktemp("build"))


def test_the_sdist_and_the_wheel_carry_every_module_and_the_calibration_table(built):
    sdist, wheel = built
    with tarfile.open(sdist) as tar:
        in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    carried = {f"kernels/{m.removeprefix('granger_mpi/kernels/')}"
               if m.startswith("granger_mpi/kernels/") else m for m in modules()}
    assert carried <= in_sdist, sorted(carried - in_sdist)
    with zipfile.ZipFile(wheel) as whl:
        in_wheel = set(whl.namelist())
        entry_points = whl.read(f"granger_mpi-{VERSION}.dist-info/entry_points.txt").decode()
    assert modules() <= in_wheel, sorted(modules() - in_wheel)
    assert "granger-mpi = granger_mpi.cli:main" in entry_points
    assert not any(name.startswith(("tests/", "kernels/")) for name in in_wheel)


def test_the_installed_wheel_passes_doctor_and_trains_on_2_ranks_outside_the_repository(
        built, tmp_path):
    _, wheel = built
    python = fresh_environment(tmp_path / "env")
    install = run_command([python, "-m", "pip", "install", "--no-index", wheel], timeout=120)
    assert install.returncode == 0, install.output
    assert "Requirement already satisfied: h5py" in install.stdout   # the parallel one, reused

    work = tmp_path / "work"
    work.mkdir()
    mpi_bin = Path(sys.executable).parent
    # mpi4py would take another libmpi of the machine's if one came first (Debian's
    # libmpi.so is Open MPI 4's): MPI4PY_LIBMPI names the site's, as the README says.
    env = {"PATH": f"{python.parent}:{mpi_bin}:{os.environ['PATH']}",
           "LD_LIBRARY_PATH": str(mpi_bin.parent / "lib"), "PYTHONPATH": "",
           "MPI4PY_LIBMPI": str(mpi_bin.parent / "lib" / "libmpi.so.40")}
    granger = python.parent / "granger-mpi"

    doctor = run_command([granger, "doctor"], timeout=120, env=env, cwd=work)
    assert doctor.returncode == 0, doctor.output
    assert f"granger-mpi: {VERSION} ({python.parent.parent}" in doctor.stdout, doctor.output
    assert "parallel (mpio driver)" in doctor.stdout and "MPI library: Open MPI v5" in doctor.stdout

    made = run_command([granger, "make-dataset", "data.h5", "--rows", "2048", "--features", "8",
                        "--classes", "3"], timeout=120, env=env, cwd=work)
    assert made.returncode == 0, made.output
    job = write_job(work / "job.toml", dataset=work / "data.h5", run_dir=work / "run",
                    collectives={"algorithm": "auto"})
    run = run_command([granger, "run", job, "-n", "2"], timeout=180, env=env, cwd=work)
    assert run.returncode == 0, run.output
    assert "fault tolerance: ULFM" in run.stdout, run.output
    assert "calibrated at" in run.stdout, run.output     # auto found its table in the package
    assert (work / "run" / "model.h5").exists() and (work / "run" / "COMPLETE").exists()
