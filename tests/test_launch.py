"""The launchers start ranks that run granger-mpi's own code, whatever the directory holds."""

import json

import pytest

from conftest import GRANGER, MPIRUN, run_command, write_job

PLANTED = """\
import pathlib
pathlib.Path(__file__).with_name("MARKER").write_text("planted code ran")
raise SystemExit("planted argparse.py ran")
"""


@pytest.mark.parametrize("verb", ["supervise", "run"])
def test_code_in_the_working_directory_never_runs_on_a_rank(verb, small_dataset, tmp_path):
    """``python -m`` puts the current directory first on ``sys.path``: an ``argparse.py``
    left in a shared or world-writable submit directory would run on every rank."""
    where = tmp_path / "submit"
    where.mkdir()
    (where / "argparse.py").write_text(PLANTED)
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.toml", dataset=small_dataset, run_dir=run_dir,
                    train={"max_steps": 4}, fault={"mode": "restart"})
    run = run_command([*GRANGER, verb, job, "-n", "2", "--mpirun", MPIRUN[0]], timeout=120,
                      cwd=where)
    assert not (where / "MARKER").exists(), run.output
    assert run.returncode == 0, run.output
    assert json.loads((run_dir / "COMPLETE").read_text())["steps"] == 4
