"""MPI plumbing under real mpirun: errors agreed on, or handed out by rank 0."""

from conftest import mpirun_script


def test_rank_0s_outcome_reaches_every_rank_with_its_message_and_exit_code(tmp_path):
    """``raise_from_root``: nothing raised when rank 0 has no error; its error, with its exit
    code, on every rank when it has (an empty message, and one beyond MPI's eager limit)."""
    run = mpirun_script(3, """
        from mpi4py import MPI
        from granger_mpi.errors import UserError
        from granger_mpi.mpi.runtime import raise_from_root
        comm = MPI.COMM_WORLD
        rank = comm.Get_rank()
        raise_from_root(comm, None)
        print("rank", rank, "no error", flush=True)
        for length in (0, 10, 200_000):
            error = None
            if rank == 0:
                error = UserError("x" * length)
                error.exit_code = 7
            try:
                raise_from_root(comm, error)
            except UserError as exc:
                print("rank", rank, "raised", len(str(exc)), set(str(exc)) <= {"x"},
                      exc.exit_code, exc.agreed, flush=True)
    """, tmp_path=tmp_path, timeout=60)
    assert run.returncode == 0, run.output
    for rank in range(3):
        assert f"rank {rank} no error" in run.stdout, run.output
        for length in (0, 10, 200_000):
            assert f"rank {rank} raised {length} True 7 True" in run.stdout, run.output


def test_first_text_and_gather_text_move_strings_with_buffer_calls(tmp_path):
    """``first_text``: the lowest key's text on every rank (the lowest rank on a tie);
    ``gather_text``: every rank's text, in rank order, on the root only (empty ones too)."""
    run = mpirun_script(4, """
        from mpi4py import MPI
        from granger_mpi.mpi.runtime import first_text, gather_text
        comm = MPI.COMM_WORLD
        rank = comm.Get_rank()
        print("rank", rank, "first", first_text(comm, [5, 3, 3, 9][rank], f"from {rank}"), flush=True)
        print("rank", rank, "gathered", gather_text(comm, "é" * rank, root=1), flush=True)
    """, tmp_path=tmp_path, timeout=60)
    assert run.returncode == 0, run.output
    for rank in range(4):
        assert f"rank {rank} first (3, 'from 1')" in run.stdout, run.output
        expected = ['', 'é', 'éé', 'ééé'] if rank == 1 else []
        assert f"rank {rank} gathered {expected}" in run.stdout, run.output
