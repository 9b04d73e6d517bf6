"""ULFM (user-level failure mitigation): is it there, how to launch it, what a failure is.

mpi4py on an MPI without ULFM quietly substitutes (``Shrink`` becomes a ``Dup``), and Open
MPI started without ``--with-ft ulfm`` turns the calls into no-ops: so a run decides "ULFM
or restart" from a real probe, never from the library's name.
"""

import os
from contextlib import contextmanager

from mpi4py import MPI

# Open MPI 5: fault tolerance on, and TCP (the shared-memory transport hung the survivors).
LAUNCH_FLAGS = ("--with-ft", "ulfm", "--mca", "pml", "ob1", "--mca", "btl", "tcp,self")
_LAUNCH = "mpirun " + " ".join(LAUNCH_FLAGS)

_FAILURE_CLASSES = frozenset(getattr(MPI, name) for name in
                             ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")
                             if hasattr(MPI, name))


def probe() -> tuple[bool, str]:
    """``(available, detail)``: does the library have ULFM, and is it switched on in this job?

    The library part is a real revoke on a private communicator: mpi4py without ULFM
    raises ``NotImplementedError``, and only a later call failing with ``ERR_REVOKED``
    proves that revoke works. Open MPI also needs fault tolerance switched on at launch
    (``--with-ft ulfm`` sets the MCA parameter ``mpi_ft_enable``), or a dead peer still
    ends the job; and the shared-memory transport hangs after a failure.
    """
    comm = MPI.COMM_SELF.Dup()
    try:
        comm.Set_errhandler(MPI.ERRORS_RETURN)
        try:
            comm.Revoke()
        except NotImplementedError:
            return False, "the MPI library has no ULFM (MPIX_Comm_revoke missing)"
        except MPI.Exception as exc:
            return False, f"MPIX_Comm_revoke failed: {exc.Get_error_string()}"
        try:
            comm.Barrier()
            return False, "MPIX_Comm_revoke is a no-op in this MPI library"
        except MPI.Exception as exc:
            if exc.Get_error_class() != MPI.ERR_REVOKED:
                return False, f"unexpected error after revoke: {exc.Get_error_string()}"
    finally:
        comm.Free()
    enabled = os.environ.get("OMPI_MCA_mpi_ft_enable", "").lower() in ("1", "true", "yes")
    if not enabled:
        return False, f"the library has ULFM but this job did not enable it; launch with {_LAUNCH}"
    btl = os.environ.get("OMPI_MCA_btl", "")
    if not btl or any(t in btl.split(",") for t in ("sm", "vader")):
        return False, (f"ULFM is on but the shared-memory transport may hang after a failure "
                       f"(btl={btl or 'default'}); launch with {_LAUNCH}")
    return True, "revoke works and fault tolerance is on in this job (mpi_ft_enable, btl " + btl + ")"


class RankFailure(Exception):
    """A peer died during ``where``: the MPI error that said so is ``error``."""

    def __init__(self, where: str, error: MPI.Exception):
        super().__init__(f"rank failure during {where}: {error.Get_error_string().strip()}")
        self.where = where
        self.error = error


def is_rank_failure(exc: MPI.Exception, comm: MPI.Comm) -> bool:
    """Whether an MPI error means a peer died (some ranks see only MPI_ERR_OTHER from a
    collective that a dead rank broke, so ULFM's list of failed ranks is asked as well)."""
    if exc.Get_error_class() in _FAILURE_CLASSES:
        return True
    try:
        return comm.Get_failed().Get_size() > 0
    except (MPI.Exception, NotImplementedError):
        return False


@contextmanager
def rank_failures(comm: MPI.Comm, where):
    """Turn an MPI error inside the block that means a dead peer into ``RankFailure``:
    the one place where MPI errors are classified. ``where`` names what failed: a string,
    or a callable asked at the failure (a block that goes through several phases)."""
    try:
        yield
    except MPI.Exception as exc:
        if is_rank_failure(exc, comm):
            raise RankFailure(where() if callable(where) else where, exc) from exc
        raise
