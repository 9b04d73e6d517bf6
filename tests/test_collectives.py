"""Hand-written collectives under real mpirun, against MPI_Allreduce."""

from pathlib import Path

import pytest

from conftest import MPIRUN, PYTHON, run_command
from granger_mpi.collectives import pieces

PROGRAMS = Path(__file__).parent / "programs"


@pytest.mark.parametrize("ranks,ranks_per_node", [(1, None), (2, None), (3, None), (4, 2), (5, 2),
                                                   (7, 3), (8, None)])
def test_every_algorithm_matches_mpi_allreduce(ranks, ranks_per_node):
    """Sizes 0, 1, P-1, P, 1000, 2^20+3; float32 and float64; random and integer data.

    Hierarchical runs on emulated nodes of ``ranks_per_node`` ranks (uneven where P is not
    a multiple), else on the real node split (one node here).
    """
    args = [] if ranks_per_node is None else [str(ranks_per_node)]
    run = run_command([*MPIRUN, "-n", str(ranks), PYTHON, PROGRAMS / "check_collectives.py", *args],
                      timeout=240)
    assert run.returncode == 0, run.output
    assert f"checked P={ranks} on 1 node(s)" in run.stdout and ": 0 failure(s)" in run.stdout


def test_buffers_longer_than_the_count_limit_are_split():
    run = run_command([*MPIRUN, "-n", "3", PYTHON, PROGRAMS / "check_collectives.py", "-", "5003"],
                      timeout=240, env={"GRANGER_COLLECTIVE_MAX_COUNT": "100"})
    assert run.returncode == 0 and "0 failure(s)" in run.stdout, run.output
    assert pieces(250, 100) == [(0, 100), (100, 200), (200, 250)] and pieces(0, 100) == []


def test_mismatched_calls_fail_with_the_ranks_named_instead_of_hanging():
    run = run_command([*MPIRUN, "-n", "3", PYTHON, PROGRAMS / "mismatch.py"], timeout=60,
                      env={"GRANGER_CHECK_COLLECTIVES": "1"})
    assert run.returncode == 0, run.output
    assert run.stdout.count("caught: allreduce called with different arguments") == 3, run.output
    assert "ranks [1] differ from rank 0" in run.stdout
    assert "rank 1: ring, 9 x float32" in run.stdout


@pytest.mark.parametrize("ranks", [2, 3])
def test_peak_extra_memory_is_at_most_one_buffer(ranks):
    run = run_command([*MPIRUN, "-n", str(ranks), PYTHON, PROGRAMS / "check_memory.py"], timeout=120)
    assert run.returncode == 0, run.output
    assert run.stdout.count("peak extra memory") == 6
