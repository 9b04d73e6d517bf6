"""Rank failures (``ulfm.RankFailure``): what the survivors do.

``UlfmRecovery`` revokes the communicator, shrinks it, agrees on the place every survivor
goes on from (the earliest any of them is at) and gives dead ranks' places to spare ranks
(``spares``); ``NoRecovery`` (restart mode) lets the failure end the run, for the supervisor
or Slurm to restart it from a checkpoint. Both keep the membership (the world rank of each
rank, the spares, who was lost), so the loop has no ``if ulfm``.
"""

import socket
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
from mpi4py import MPI

from granger_mpi.mpi.ulfm import is_rank_failure, RankFailure
from granger_mpi.training.spares import Roles


@dataclass(frozen=True)
class Recovered:
    """The outcome of one recovery, the same on every survivor."""

    comm: MPI.Comm | None   # the new training communicator (None on a spare still waiting)
    place: tuple            # (steps completed, phase): where every survivor goes on from
    gone: list              # world ranks lost in this failure
    replaced: dict          # {spare: the world rank whose place it took}
    detected: float         # time.time() when this rank saw the failure
    seconds: float          # the whole recovery
    split: dict             # seconds of each part: revoke_s, shrink_s, agree_s, transfer_s

    @property
    def step(self) -> int:
        return self.place[0]


# The place of a rank without the training state (a spare): later than any real one.
NO_PLACE = (1 << 62, 1 << 30)


class NoRecovery:
    """Restart mode: a rank failure is not survived here; it ends the run."""

    enabled = False

    def __init__(self, members: MPI.Comm, roles: Roles):
        self.members = members     # every rank of the job: training ranks and spares
        self.roles = roles
        self.member_idents = list(range(members.Get_size()))   # world rank of each member
        self.lost: list[int] = []
        self.generation = 0        # failures survived

    @property
    def idents(self) -> list[int]:
        """The world rank of each rank of the training communicator."""
        return list(self.roles.training)

    def ranks_of(self, idents) -> list[int]:
        """Ranks in ``members`` of the world ranks ``idents``."""
        return [self.member_idents.index(ident) for ident in idents]

    def admit(self, failure: RankFailure) -> None:
        """Raise the failure's MPI error unless this run survives it (then ``recover``)."""
        raise failure.error

    def confirm(self, comm: MPI.Comm) -> None:
        """Collective: nothing to confirm without ULFM (a failure ends the job anyway)."""


class UlfmRecovery(NoRecovery):
    """Revoke, shrink, agree on a place, fill dead places with spares: the survivors go
    on on a new communicator."""

    enabled = True

    def admit(self, failure: RankFailure) -> None:
        return None

    def recover(self, comm: MPI.Comm | None, place: Callable[[], tuple],
                settle: Callable[[MPI.Comm, tuple, dict], None]) -> Recovered:
        """Collective over the surviving members (training ranks on ``comm``, spares with
        None): the earliest ``place()`` (steps completed, phase) of any of them, then
        ``settle(training communicator, place, replaced)`` on the training ranks (go to
        the place; hand the state to the spares that joined). A failure during any of it
        starts it again (docs/architecture.md, "Recovery")."""
        detected = time.time()
        split = dict(revoke_s=0.0, shrink_s=0.0, agree_s=0.0, transfer_s=0.0)
        if comm is not None and comm != self.members:
            _revoke(comm)      # wakes the training ranks still inside one of its collectives
        members, idents, roles, replaced = self.members, self.member_idents, self.roles, {}
        while True:
            mark = time.perf_counter()
            _revoke(members)   # wakes the spares
            split["revoke_s"] += time.perf_counter() - mark
            mark = time.perf_counter()
            new = members.Shrink()
            new.Set_errhandler(MPI.ERRORS_RETURN)
            split["shrink_s"] += time.perf_counter() - mark
            idents = [idents[r] for r in _translate(new, members)]
            roles, now = roles.after(set(idents))
            # A spare that took a place and died in this recovery hands on the place it took.
            replaced = {spare: replaced.get(dead, dead) for spare, dead in now.items()} | {
                spare: dead for spare, dead in replaced.items() if spare in idents}
            training, ok = None, 1
            try:
                mark = time.perf_counter()
                agreed = _earliest(new, place())
                split["agree_s"] += time.perf_counter() - mark
                training = new if self.members == comm else split_training(new, roles, idents)
                if training is not None:
                    mark = time.perf_counter()
                    settle(training, agreed, replaced)
                    split["transfer_s"] += time.perf_counter() - mark
            except MPI.Exception as exc:
                if not is_rank_failure(exc, new):
                    raise
                ok = 0
            mark = time.perf_counter()
            try:
                ok = new.Agree(ok)
            except MPI.Exception as exc:
                if not is_rank_failure(exc, new):
                    raise
                ok = 0
            split["agree_s"] += time.perf_counter() - mark
            if ok:
                break
            members = new     # another rank died while recovering: shrink again
        gone = sorted(set(self.member_idents) - set(idents))
        self.members, self.member_idents, self.roles = new, idents, roles
        self.lost.extend(gone)
        self.generation += 1
        return Recovered(training, agreed, gone, replaced, detected, time.time() - detected, split)

    def confirm(self, comm: MPI.Comm) -> None:
        """Collective: ``MPI_Comm_agree``, whose failure, unlike any other collective's, is
        raised on every survivor alike: the end of a run that all of them reach or none."""
        comm.Agree(1)


def _revoke(comm: MPI.Comm) -> None:
    try:
        comm.Revoke()
    except MPI.Exception:
        pass   # already revoked by another survivor


def _earliest(comm: MPI.Comm, place: tuple) -> tuple:
    """Collective: the earliest place of any rank (the phase among those at the earliest
    step). Every rank that held the state dying at once leaves nothing to go on from."""
    agreed = np.array(place, np.int64)
    comm.Allreduce(MPI.IN_PLACE, agreed[:1], op=MPI.MIN)
    at_step = np.array([place[1] if place[0] == agreed[0] else NO_PLACE[1]], np.int64)
    comm.Allreduce(MPI.IN_PLACE, at_step, op=MPI.MIN)
    if agreed[0] == NO_PLACE[0]:
        raise RuntimeError("every rank that held the training state died at once (only spares "
                           "are left); restart from the newest checkpoint with --resume auto")
    return int(agreed[0]), int(at_step[0])


def split_training(members: MPI.Comm, roles: Roles, idents: list) -> MPI.Comm | None:
    """Collective: the training communicator, its ranks in the order of ``roles.training``
    (None on a spare)."""
    mine = idents[members.Get_rank()]
    training = roles.training.index(mine) if mine in roles.training else None
    comm = members.Split(MPI.UNDEFINED if training is None else 0, training or 0)
    if comm == MPI.COMM_NULL:
        return None
    comm.Set_errhandler(MPI.ERRORS_RETURN)
    return comm


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
