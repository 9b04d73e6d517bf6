"""MPI plumbing shared by the commands: agreeing on errors, rank-aware printing.

Every function takes its communicator as an argument; only the CLI touches COMM_WORLD.
"""

import math
import os
import sys
import time

import numpy as np
from mpi4py import MPI

from granger_mpi.errors import UserError


def bcast_text(comm, text, root):
    """Broadcast a string from ``root`` with buffer calls (no pickle)."""
    data = np.frombuffer(text.encode(), np.uint8) if comm.Get_rank() == root else None
    length = np.array([0 if data is None else data.size], np.int64)
    comm.Bcast(length, root=root)
    buf = data.copy() if data is not None else np.empty(length[0], np.uint8)
    comm.Bcast(buf, root=root)
    return buf.tobytes().decode()


def agree(comm, fn, *args, **kwargs):
    """Call ``fn`` on every rank; if it raises ``UserError`` on any, raise it on all.

    Collective over ``comm``. Ranks that validate the same input normally fail alike; this
    makes sure that when only some do, the others do not go on into a collective and hang.
    The error raised everywhere carries the lowest failing rank's message and exit code.
    """
    error = None
    result = None
    try:
        result = fn(*args, **kwargs)
    except UserError as exc:
        error = exc
    raise_agreed(comm, error)
    return result


_POLL_S = 1e-4    # how long ranks that agree ``sleeping`` sleep between polls
_SPIN_S = 2e-3    # the most they poll without sleeping, from ``spin_after`` on


def raise_agreed(comm, error, sleeping=None, spin_after=None):
    """Collective over ``comm``: when ``error`` (a ``UserError``, or None) is set on any
    rank, raise the lowest such rank's error (message and exit code) on every rank.

    ``sleeping`` True: this rank polls the agreement and sleeps in between instead of
    spinning in MPI, for ranks that wait a long time for one busy rank (a checkpoint rank 0
    writes alone), so that they leave the cores to its I/O threads and the kernel's
    writeback; it serves as the barrier they wait in. A sleeping rank sees the end 0.3-0.6
    ms late here (its core has to wake up); ``spin_after`` (seconds, when this rank expects
    the end about then) makes it poll without sleeping from then on, yielding its core
    between polls, for at most ``_SPIN_S``. False: the busy rank's side of that (it just
    waits). Every rank must pass None (a blocking ``Allreduce``) or every rank True or False
    (one ``Iallreduce``).
    """
    rank = comm.Get_rank()
    failing = np.array([rank if error is not None else comm.Get_size()], np.int64)
    if sleeping is None:
        comm.Allreduce(MPI.IN_PLACE, failing, op=MPI.MIN)
    else:
        request = comm.Iallreduce(MPI.IN_PLACE, failing, op=MPI.MIN)
        if sleeping:
            _poll(request, spin_after)
        request.Wait()
    first = int(failing[0])
    if first == comm.Get_size():
        return
    code = np.array([error.exit_code if rank == first else 0], np.int64)
    comm.Bcast(code, root=first)
    message = bcast_text(comm, str(error) if rank == first else "", first)
    agreed = UserError(message, agreed=True)
    agreed.exit_code = int(code[0])
    raise agreed


def _poll(request, spin_after):
    """Test ``request`` until it completes, sleeping ``_POLL_S`` between tests, except from
    ``spin_after`` seconds to ``_SPIN_S`` later (None: never), when it yields instead."""
    spin_from = time.perf_counter() + (math.inf if spin_after is None else spin_after)
    while not request.Test():
        if spin_from <= time.perf_counter() < spin_from + _SPIN_S:
            os.sched_yield()
        else:
            time.sleep(_POLL_S)


def say(comm, message, *, file=sys.stdout):
    """Print from rank 0 only, flushed (stdout of other ranks is noise in a job log)."""
    if comm.Get_rank() == 0:
        print(message, file=file, flush=True)


def world():
    """``MPI.COMM_WORLD``, starting MPI first if needed (only the CLI should call this)."""
    if not MPI.Is_initialized():
        MPI.Init_thread()
    return MPI.COMM_WORLD


def mpi_library_version():
    """First line of ``MPI_Get_library_version`` (Open MPI pads it with NULs)."""
    return MPI.Get_library_version().replace("\x00", "").splitlines()[0].strip()
