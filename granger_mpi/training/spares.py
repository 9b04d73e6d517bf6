"""Spare ranks: members of the job that do no work until a training rank dies.

A job launched with P + S ranks and ``[fault].spares = S`` trains on the first P; the last
S wait. When a training rank dies, the recovery (``recovery.UlfmRecovery``) gives its
logical place, and so its share of the data and its position in the exchange, to the
first spare left, which receives the training state from a survivor: the run goes on at
P, with the result of a run that never failed. With no spare left, the job shrinks.

A spare waits for the run's end: one message from every training rank, received with
nonblocking receives polled between short sleeps, because Open MPI's blocking waits spin
a core. A recovery revokes the job's communicator, which completes those receives at once
with ``MPI_ERR_REVOKED``: the spare's cue to join it.
"""

import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from granger_mpi.mpi.ulfm import RankFailure

RELEASE_TAG = 7301
POLL_S = 0.01          # a spare's sleep between polls: the delay it adds to a recovery
# How the run ended, in the release message: [outcome, steps completed].
COMPLETED, STOPPED, PAST_LIMITS, FAILED = range(4)


@dataclass(frozen=True)
class Roles:
    """Who does what: the world rank of each logical training rank, and the spares left."""

    training: tuple[int, ...]
    spares: tuple[int, ...]

    @classmethod
    def initial(cls, size: int, spares: int) -> "Roles":
        """The first ``size - spares`` ranks train, the last ``spares`` wait."""
        return cls(tuple(range(size - spares)), tuple(range(size - spares, size)))

    def after(self, alive: set) -> tuple["Roles", dict]:
        """The roles once only the world ranks ``alive`` are left: a dead training rank's
        place goes to the first spare left; with none left, the place is dropped (the job
        shrinks, its ranks keeping their order). Returns ``(roles, {spare: the world rank
        whose place it took})``."""
        spares = [rank for rank in self.spares if rank in alive]
        training, replaced = [], {}
        for rank in self.training:
            if rank in alive:
                training.append(rank)
            elif spares:
                replaced[spares[0]] = rank
                training.append(spares.pop(0))
        return Roles(tuple(training), tuple(spares)), replaced


def wait(members: MPI.Comm, sources: list[int], poll_s: float = POLL_S) -> np.ndarray:
    """Idle until the run ends: returns the release message ``[outcome, steps]`` from the
    training ranks ``sources`` (ranks of ``members``; one that died sends none). Raises
    ``RankFailure`` when a recovery revokes ``members``."""
    messages = np.full((len(sources), 2), -1, np.int64)
    requests = [members.Irecv(messages[i], source=source, tag=RELEASE_TAG)
                for i, source in enumerate(sources)]
    pending, revoked = set(range(len(requests))), None
    while pending:
        for i in sorted(pending):
            try:
                done = requests[i].Test()
            except MPI.Exception as exc:
                done = True       # that training rank died (the others go on, or recover)
                if exc.Get_error_class() == MPI.ERR_REVOKED:
                    revoked = exc
            if done:
                pending.discard(i)
        if revoked is not None and not pending:
            raise RankFailure("a spare's wait", revoked)
        if pending:
            time.sleep(poll_s)
    sent = messages[messages[:, 0] >= 0]
    return sent[0] if len(sent) else np.array([FAILED, 0], np.int64)


def release(members: MPI.Comm, spares: list[int], outcome: int, steps: int) -> None:
    """Tell the spares (ranks of ``members``) that the run ended, and how; one that died
    idle is skipped."""
    message = np.array([outcome, steps], np.int64)
    for spare in spares:
        try:
            members.Isend(message, dest=spare, tag=RELEASE_TAG).Wait()
        except MPI.Exception:
            pass
