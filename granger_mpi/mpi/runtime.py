"""MPI plumbing shared by the commands: agreeing on errors, rank-aware printing.

Every function takes its communicator as an argument; only the CLI touches COMM_WORLD.
"""

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


def first_text(comm, key, text):
    """Collective: ``(lowest key, the text of the rank that holds it)`` on every rank (the
    lowest such rank on a tie), with buffer calls (no pickle)."""
    keys = np.array([key], np.int64)
    comm.Allreduce(MPI.IN_PLACE, keys, op=MPI.MIN)
    holder = np.array([comm.Get_rank() if key == keys[0] else comm.Get_size()], np.int64)
    comm.Allreduce(MPI.IN_PLACE, holder, op=MPI.MIN)
    root = int(holder[0])
    return int(keys[0]), bcast_text(comm, text if comm.Get_rank() == root else "", root)


def gather_text(comm, text, root=0):
    """Collective: every rank's ``text`` in rank order on ``root`` (an empty list on the
    others), with buffer calls (no pickle)."""
    data = np.frombuffer(text.encode(), np.uint8)
    mine = comm.Get_rank() == root
    lengths = np.empty(comm.Get_size(), np.int64) if mine else None
    comm.Gather(np.array([data.size], np.int64), lengths, root=root)
    if not mine:
        comm.Gatherv(data, None, root=root)
        return []
    buf = np.empty(int(lengths.sum()), np.uint8)
    comm.Gatherv(data, (buf, lengths.tolist()), root=root)
    ends = np.cumsum(lengths)
    return [buf[end - n:end].tobytes().decode() for n, end in zip(lengths, ends)]


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


def raise_agreed(comm, error):
    """Collective over ``comm``: when ``error`` (a ``UserError``, or None) is set on any
    rank, raise the lowest such rank's error (message and exit code) on every rank."""
    rank = comm.Get_rank()
    failing = np.array([rank if error is not None else comm.Get_size()], np.int64)
    comm.Allreduce(MPI.IN_PLACE, failing, op=MPI.MIN)
    first = int(failing[0])
    if first == comm.Get_size():
        return
    code = np.array([error.exit_code if rank == first else 0], np.int64)
    comm.Bcast(code, root=first)
    _raise_agreed_error(bcast_text(comm, str(error) if rank == first else "", first), code[0])


def _raise_agreed_error(message, exit_code):
    agreed = UserError(message, agreed=True)
    agreed.exit_code = int(exit_code)
    raise agreed


_OUTCOME_TAG = 0x676F       # the point-to-point tag of ``raise_from_root``'s messages
_POLL_S = 1e-4              # how long the ranks waiting for rank 0 sleep between polls


def raise_from_root(comm, error, sequence=0):
    """Collective over ``comm``: when rank 0's ``error`` (a ``UserError``, or None; the
    other ranks' is ignored) is set, raise it (message and exit code) on every rank.

    For ranks that wait a long time for rank 0 alone (a checkpoint it writes by itself):
    they poll for its message and sleep in between instead of spinning in MPI, leaving the
    cores to its I/O. When rank 0 dies, the others see an MPI error here; when another rank
    dies, its peers see one in their next collective. ``sequence`` (a checkpoint's step)
    travels in the message: one left over from an earlier call is drained, never taken
    for this call's outcome.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    failed = rank == 0 and error is not None
    text = str(error).encode() if failed else b""
    header = np.array([sequence, failed, error.exit_code if failed else 0, len(text)], np.int64)
    if rank == 0:
        requests = [comm.Isend(header, dest=r, tag=_OUTCOME_TAG) for r in range(1, size)]
        if failed:
            body = np.frombuffer(text, np.uint8)
            requests += [comm.Isend(body, dest=r, tag=_OUTCOME_TAG + 1) for r in range(1, size)]
        MPI.Request.Waitall(requests)
    else:
        while True:
            request = comm.Irecv(header, source=0, tag=_OUTCOME_TAG)
            while not request.Test():
                time.sleep(_POLL_S)
            if header[1]:
                body = np.empty(int(header[3]), np.uint8)
                comm.Recv(body, source=0, tag=_OUTCOME_TAG + 1)
                text = body.tobytes()
            if header[0] == sequence:
                break
    if header[1]:
        _raise_agreed_error(text.decode(), header[2])


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
