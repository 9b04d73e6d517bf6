"""Fault injection for tests and demos: ``--inject-failure rank=R,step=S,mode=M[,at=A]``.

A rank (numbered in ``MPI_COMM_WORLD``, so the number survives shrinks) fails on purpose
when it reaches step ``S``:

- ``mode``: ``exit`` (leaves at once with exit code 1, without ``MPI_Finalize``, like a
  crash), ``kill9`` (SIGKILL to itself, like the OOM killer) or ``hang`` (stops making
  progress but stays alive, like a rank stuck on a dead file system; the watchdog's case)
  or ``slow`` (a straggler: sleeps ``seconds``, default 1, then goes on; the others wait,
  which the per-rank time split in ``metrics.h5`` shows);
- ``at``: ``compute`` (before its gradient is exchanged; default), ``allreduce`` (inside
  the hand-written allreduce, after its first point-to-point exchange, so its peers are
  mid-collective; with ``native``, just before entering ``MPI_Allreduce``), ``checkpoint``
  (after writing its share of the checkpoint at step ``S``, before the file is closed) or
  ``report`` (after step ``S``, just before the per-rank timing report's ``Gather``, which
  only rank 0 sees fail: the others meet the failure in the next allreduce) or
  ``validation`` (after step ``S``, before the validation's reduction) or ``end``
  (after the last step and its checkpoint, before ``model.h5`` is written; ``S`` is the
  run's step count) or ``recovery`` (on entering the recovery from a failure at step
  ``S``: a second failure while the survivors shrink and agree).

``rank=*`` plans the injection for every rank; ``step=*`` (with ``mode=slow`` only) for
every step, silently: a throttle that keeps a small job running long enough for a signal,
a kill or a timer to land in the middle of it (``rank=*,step=*,mode=slow,seconds=0.005``).

Each other injection fires once per process. The line it prints first (``inject: ...`` with a
wall-clock time) lets benchmarks measure detection and recovery from the moment of failure.
"""

import os
import signal
import sys
import time
from dataclasses import dataclass

from granger_mpi import collectives
from granger_mpi.errors import UserError

MODES = ("exit", "kill9", "hang", "slow")
EVERY = -1     # rank=* or step=*
PLACES = ("compute", "allreduce", "checkpoint", "report", "validation", "end", "recovery")


@dataclass(frozen=True)
class Injection:
    """One planned failure."""

    rank: int
    step: int
    mode: str = "kill9"
    at: str = "compute"
    seconds: float = 1.0    # how long a ``slow`` rank stalls

    def __str__(self):
        slow = f",seconds={self.seconds:g}" if self.mode == "slow" else ""
        rank, step = ("*" if n == EVERY else n for n in (self.rank, self.step))
        return f"rank={rank},step={step},mode={self.mode},at={self.at}{slow}"


def parse(text):
    """``"rank=2,step=30,mode=kill9,at=allreduce"`` -> ``Injection`` (``UserError`` if bad)."""
    fields = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or key.strip() not in ("rank", "step", "mode", "at", "seconds"):
            raise UserError(f"--inject-failure {text!r}: expected rank=R,step=S[,mode={'|'.join(MODES)}]"
                            f"[,at={'|'.join(PLACES)}][,seconds=T], got {item!r}")
        fields[key.strip()] = value.strip()
    if "rank" not in fields or "step" not in fields:
        raise UserError(f"--inject-failure {text!r}: rank= and step= are required")
    try:
        rank, step = (EVERY if fields[k] == "*" else int(fields[k]) for k in ("rank", "step"))
    except ValueError:
        raise UserError(f"--inject-failure {text!r}: rank and step must be integers or *") from None
    mode, at = fields.get("mode", "kill9"), fields.get("at", "compute")
    if mode not in MODES or at not in PLACES or min(rank, step) < EVERY:
        raise UserError(f"--inject-failure {text!r}: mode is one of {', '.join(MODES)}, at one of "
                        f"{', '.join(PLACES)}; rank and step are >= 0 or *")
    if step == EVERY and mode != "slow":
        raise UserError(f"--inject-failure {text!r}: step=* goes with mode=slow")
    try:
        seconds = float(fields.get("seconds", 1.0))
    except ValueError:
        seconds = -1.0
    if "seconds" in fields and (mode != "slow" or not 0 <= seconds < 86400):
        raise UserError(f"--inject-failure {text!r}: seconds= (0 to 86400) goes with mode=slow")
    return Injection(rank, step, mode, at, seconds)


def fail(injection, out=sys.stderr):
    """Fail now, as ``injection.mode`` says (``hang`` never returns; ``slow`` does, late)."""
    print(f"inject: rank {injection.rank} {injection.mode} at step {injection.step} "
          f"({injection.at}) t={time.time():.6f}", file=out, flush=True)
    if injection.mode == "slow":
        time.sleep(injection.seconds)
        return
    if injection.mode == "kill9":
        os.kill(os.getpid(), signal.SIGKILL)
    if injection.mode == "exit":
        os._exit(1)
    while True:          # hang: alive, holding no lock the watchdog thread needs
        time.sleep(3600)


class Injector:
    """The injections planned for this process (``world_rank``), fired where they belong."""

    def __init__(self, injections, world_rank):
        self.pending = [i for i in injections if i.rank in (world_rank, EVERY)]

    def _take(self, step, at):
        for injection in self.pending:
            if injection.step == step and injection.at == at:
                self.pending.remove(injection)
                return injection
        return None

    def _fire(self, step, at):
        """Fail now if an injection is planned for ``step`` at ``at`` (after the throttle's
        pause, if one is planned for every step there)."""
        if not self.pending:
            return
        for injection in self.pending:
            if injection.step == EVERY and injection.at == at:
                time.sleep(injection.seconds)     # silently: a line per step is noise
        injection = self._take(step, at)
        if injection:
            fail(injection)

    def at_compute(self, step):
        """Called before the step's gradient exchange."""
        self._fire(step, "compute")

    def arm_allreduce(self, step, algorithm):
        """Called before the step's allreduce: fail after its first point-to-point exchange
        (with ``native``, whose insides are MPI's, just before entering it)."""
        if not self.pending:
            return
        injection = self._take(step, "allreduce")
        if injection and algorithm == "native":
            fail(injection)
        if injection:
            collectives.fail_after_next_exchange(lambda: fail(injection))

    def at_report(self, step):
        """Called before the timing report after step ``step``."""
        self._fire(step, "report")

    def at_validation(self, step):
        """Called before the validation after step ``step``."""
        self._fire(step, "validation")

    def at_end(self, step):
        """Called after the final checkpoint, before ``model.h5``; ``step``: steps done."""
        self._fire(step, "end")

    def at_recovery(self, step):
        """Called when this rank starts recovering from a failure at step ``step``."""
        self._fire(step, "recovery")

    def checkpoint_hook(self, step):
        """A callable for ``checkpoint.save(on_written=...)`` at ``step``, or None."""
        injection = self._take(step, "checkpoint") if self.pending else None
        return (lambda: fail(injection)) if injection else None
