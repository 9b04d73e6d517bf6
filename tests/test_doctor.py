"""``doctor`` with and without mpirun, and the ULFM probe in both launch modes."""

from conftest import ULFM_FLAGS, granger, mpirun


def test_doctor_without_mpirun():
    run = granger("doctor")
    assert run.returncode == 0, run.output
    out = run.stdout
    assert "MPI library: Open MPI v5" in out and "/.venv/lib/libmpi.so" in out
    assert "HDF5: h5py" in out and "parallel (mpio driver)" in out
    assert "numba: numba" in out and "threading layer" in out
    assert "doctor: all checks passed" in out


def test_doctor_under_mpirun_reports_once_and_probes_ulfm():
    plain = mpirun(2, "doctor", timeout=60)
    assert plain.returncode == 0, plain.output
    assert plain.stdout.count("doctor: all checks passed") == 1
    assert "2 rank(s)" in plain.stdout and "sum over ranks 3, expected 3" in plain.stdout
    assert "note  ULFM fault tolerance: not available" in plain.stdout
    assert "--with-ft ulfm" in plain.stdout   # says how to turn it on

    ulfm = mpirun(2, "doctor", "--require-ulfm", mpirun_args=ULFM_FLAGS, timeout=60)
    assert ulfm.returncode == 0, ulfm.output
    assert "ok    ULFM fault tolerance: revoke works" in ulfm.stdout

    required = mpirun(2, "doctor", "--require-ulfm", timeout=60)
    assert required.returncode == 1, required.output
    assert "FAIL  ULFM fault tolerance" in required.stdout
