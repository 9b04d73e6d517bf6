"""The harness itself: a hung MPI job fails the test with every rank's stack."""

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import MPIRUN, _env, mpirun_script, run_command
from granger_mpi.launch.supervise import clear_stale_session_dir

BARE_MPIRUN = str(Path(sys.executable).parent / "mpirun")    # the venv's, without scripts/mpirun

DEADLOCK = """
import faulthandler, signal
faulthandler.register(signal.SIGUSR2, all_threads=True)
import numpy as np
from mpi4py import MPI
comm = MPI.COMM_WORLD
buf = np.zeros(1)
if comm.Get_rank() == 0:
    comm.Recv(buf, source=1, tag=99)   # rank 1 never sends
else:
    comm.Barrier()
"""


def test_hang_fails_with_the_ranks_stacks(tmp_path):
    with pytest.raises(pytest.fail.Exception) as failure:
        mpirun_script(2, DEADLOCK, tmp_path=tmp_path, timeout=8)
    message = str(failure.value)
    assert "timed out after 8 s" in message
    # faulthandler names file and line: line 9 is rank 0's Recv, line 11 rank 1's Barrier.
    assert "line 9 in <module>" in message
    assert "line 11 in <module>" in message


# A killed mpirun leaves $TMPDIR/ompi.<its pid>/pmix.<host>.tool behind; pids wrap at 32768,
# and the mpirun that gets the pid again used to die at start (CI lost a run to it). The
# shell plants such a file under its own pid and execs, so the launcher inherits that pid.
PLANT_STALE_SESSION = 'mkdir -p "$TMPDIR/ompi.$$" && echo stale > "$TMPDIR/ompi.$$/pmix.$(hostname).tool"'


def test_a_stale_session_dir_under_mpiruns_pid_breaks_a_bare_mpirun(tmp_path):
    run = run_command(["bash", "-c", f'{PLANT_STALE_SESSION}; exec "$0" -n 1 true', BARE_MPIRUN],
                      timeout=60, env={"TMPDIR": str(tmp_path)})
    assert run.returncode != 0 and "listener thread failed to start" in run.stderr, run.output


def test_scripts_mpirun_clears_a_stale_session_dir_under_its_pid(tmp_path):
    run = run_command(["bash", "-c", f'{PLANT_STALE_SESSION}; exec "$0" -n 1 true', MPIRUN[0]],
                      timeout=60, env={"TMPDIR": str(tmp_path)})
    assert run.returncode == 0, run.output


def test_supervise_clears_a_stale_session_dir_in_the_child_it_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))    # where gettempdir() looks
    def plant_then_clear():
        stale = tmp_path / f"ompi.{os.getpid()}"
        stale.mkdir()
        (stale / f"pmix.{socket.gethostname()}.tool").write_text("stale")
        clear_stale_session_dir()

    done = subprocess.run([BARE_MPIRUN, "--oversubscribe", "-n", "1", "true"], capture_output=True,
                          text=True, timeout=60, preexec_fn=plant_then_clear,
                          env={**_env(), "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
