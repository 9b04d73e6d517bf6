"""Rank failures (``ulfm.RankFailure``): what the survivors do.

``UlfmRecovery`` revokes the communicator, shrinks it, agrees on the last step every
survivor completed and rolls back to it; ``NoRecovery`` (restart mode) lets the failure end
the run, for the supervisor or Slurm to restart it from a checkpoint. Both keep the
membership (the world rank of each rank, who was lost), so the loop has no ``if ulfm``.
"""

import socket
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from granger_mpi.training.evaluation import check_replicas_identical
from granger_mpi.training.state import TrainState
from granger_mpi.mpi.ulfm import is_rank_failure, RankFailure


@dataclass(frozen=True)
class Recovered:
    """The outcome of one recovery, the same on every survivor."""

    comm: MPI.Comm          # the shrunk communicator
    step: int               # steps completed, agreed
    gone: list              # world ranks lost in this failure
    detected: float         # time.time() when this rank saw the failure
    seconds: float          # revoke + shrink + agree


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


class UlfmRecovery(NoRecovery):
    """Revoke, shrink, agree on a step, roll back: the survivors go on on a new communicator."""

    enabled = True

    def admit(self, failure: RankFailure) -> None:
        return None

    def recover(self, failure: RankFailure, comm: MPI.Comm, state: TrainState) -> Recovered:
        detected = time.time()
        new, step, idents = _shrink_and_agree(comm, state, self.idents)
        gone = sorted(set(self.idents) - set(idents))
        self.idents = idents
        self.lost.extend(gone)
        self.generation += 1
        return Recovered(new, step, gone, detected, time.time() - detected)


def _shrink_and_agree(comm, state, idents):
    """Revoke, shrink, agree on the last step every survivor completed, roll back to it.

    Returns ``(new communicator, step to continue from, world ranks of the survivors)``; a
    failure during the recovery itself shrinks again.
    """
    while True:
        try:
            comm.Revoke()
        except MPI.Exception:
            pass   # already revoked by another survivor
        new = comm.Shrink()
        new.Set_errhandler(MPI.ERRORS_RETURN)
        try:
            me = np.array([idents[comm.Get_rank()]], np.int64)
            survivors = np.empty(new.Get_size(), np.int64)
            new.Allgather(me, survivors)
            agreed = np.array([state.step], np.int64)
            new.Allreduce(MPI.IN_PLACE, agreed, op=MPI.MIN)
            state.restore(int(agreed[0]))   # this rank may have applied a step the others did not finish
            check_replicas_identical(new, state.params, "parameters after a rank failure and roll-back")
            return new, int(agreed[0]), survivors.tolist()
        except MPI.Exception as exc:
            if not is_rank_failure(exc, new):
                raise
            idents = [idents[r] for r in _translate(new, comm)]
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
