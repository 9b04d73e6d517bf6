"""The harness itself: a hung MPI job fails the test with every rank's stack."""

import pytest

from conftest import mpirun_script

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
