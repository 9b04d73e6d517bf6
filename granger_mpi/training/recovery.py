"""Rank failures (``ulfm.RankFailure``): what the survivors do.

``UlfmRecovery`` revokes the communicator, shrinks it and agrees on the place every
survivor goes on from (the earliest any of them is at); ``NoRecovery`` (restart mode) lets
the failure end the run, for the supervisor or Slurm to restart it from a checkpoint. Both keep the
membership (the world rank of each rank, who was lost), so the loop has no ``if ulfm``.
"""

import socket
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from granger_mpi.mpi.ulfm import is_rank_failure, RankFailure


@dataclass(frozen=True)
class Recovered:
    """The outcome of one recovery, the same on every survivor."""

    comm: MPI.Comm          # the shrunk communicator
    place: tuple            # (steps completed, phase): where every survivor goes on from
    gone: list              # world ranks lost in this failure
    detected: float         # time.time() when this rank saw the failure
    seconds: float          # revoke + shrink + agree
    split: dict             # seconds of each: revoke_s, shrink_s, agree_s (all attempts)

    @property
    def step(self) -> int:
        return self.place[0]


class NoRecovery:
    """Restart mode: a rank failure is not survived here; it ends the run."""

    enabled = False

    def __init__(self, comm: MPI.Comm):
        self.idents = list(range(comm.Get_size()))   # world rank of each rank of the communicator
        self.lost: list[int] = []
        self.generation = 0                          # failures survived

    def admit(self, failure: RankFailure) -> None:
        """Raise the failure's MPI error unless this run survives it (then ``recover``)."""
        raise failure.error

    def confirm(self, comm: MPI.Comm) -> None:
        """Collective: nothing to confirm without ULFM (a failure ends the job anyway)."""


class UlfmRecovery(NoRecovery):
    """Revoke, shrink, agree on a place: the survivors go on on a new communicator."""

    enabled = True

    def admit(self, failure: RankFailure) -> None:
        return None

    def recover(self, comm: MPI.Comm, place: tuple) -> Recovered:
        """Collective over the survivors of ``comm``: the earliest ``place`` (steps
        completed, phase) any of them is at; a failure during the recovery itself shrinks
        again (docs/architecture.md, "Recovery")."""
        detected = time.time()
        split = dict(revoke_s=0.0, shrink_s=0.0, agree_s=0.0)
        new, agreed, idents = _shrink_and_agree(comm, place, self.idents, split)
        gone = sorted(set(self.idents) - set(idents))
        self.idents = idents
        self.lost.extend(gone)
        self.generation += 1
        return Recovered(new, agreed, gone, detected, time.time() - detected, split)

    def confirm(self, comm: MPI.Comm) -> None:
        """Collective: ``MPI_Comm_agree``, whose failure, unlike any other collective's, is
        raised on every survivor alike: the end of a run that all of them reach or none."""
        comm.Agree(1)


def _shrink_and_agree(comm, place, idents, split):
    """Revoke, shrink, and agree on the earliest place of any survivor.

    Returns ``(new communicator, agreed place, world ranks of the survivors)``. The minimum
    is confirmed by ``MPI_Comm_agree``, which reports a failure on every survivor alike:
    so either all of them go on from the same place, or all shrink again. ``split``
    accumulates the seconds of each part.
    """
    while True:
        mark = time.perf_counter()
        try:
            comm.Revoke()
        except MPI.Exception:
            pass   # already revoked by another survivor
        split["revoke_s"] += time.perf_counter() - mark
        mark = time.perf_counter()
        new = comm.Shrink()
        new.Set_errhandler(MPI.ERRORS_RETURN)
        split["shrink_s"] += time.perf_counter() - mark
        mark = time.perf_counter()
        idents = [idents[r] for r in _translate(new, comm)]
        agreed = np.array(place, np.int64)
        ok = 1
        try:
            new.Allreduce(MPI.IN_PLACE, agreed[:1], op=MPI.MIN)
            at_step = np.array([place[1] if place[0] == agreed[0] else 1 << 30], np.int64)
            new.Allreduce(MPI.IN_PLACE, at_step, op=MPI.MIN)
            agreed[1] = at_step[0]
        except MPI.Exception as exc:
            if not is_rank_failure(exc, new):
                raise
            ok = 0
        try:
            ok = new.Agree(ok)
        except MPI.Exception as exc:
            if not is_rank_failure(exc, new):
                raise
            ok = 0
        split["agree_s"] += time.perf_counter() - mark
        if ok:
            return new, (int(agreed[0]), int(agreed[1])), idents
        comm = new     # another rank died while recovering: shrink again


def _translate(new, old):
    """Ranks in ``old`` of every rank of ``new``."""
    return MPI.Group.Translate_ranks(new.Get_group(), list(range(new.Get_size())), old.Get_group())


def hosts(comm: MPI.Comm) -> list[str]:
    """Host name of every rank of ``comm`` (buffer calls, no pickle)."""
    mine = np.zeros(64, np.uint8)
    name = socket.gethostname().encode()[:64]
    mine[:len(name)] = np.frombuffer(name, np.uint8)
    every = np.empty((comm.Get_size(), 64), np.uint8)
    comm.Allgather(mine, every)
    return [row.tobytes().rstrip(b"\0").decode() for row in every]


def past_limits(fault, size: int, lost: list, hosts: list) -> str | None:
    """Why the run must stop after losing world ranks ``lost`` (None if it may go on)."""
    if size < fault.min_ranks:
        return f"{size} rank(s) left, [fault].min_ranks is {fault.min_ranks}"
    if len(lost) > fault.max_failures:
        return f"{len(lost)} rank(s) lost in all, [fault].max_failures is {fault.max_failures}"
    if not lost:
        return None
    per_host = Counter(hosts[r] for r in lost)
    host, count = per_host.most_common(1)[0]
    if count > fault.max_failures_per_node:
        return (f"{count} rank(s) lost on host {host}, [fault].max_failures_per_node is "
                f"{fault.max_failures_per_node}")
    return None
