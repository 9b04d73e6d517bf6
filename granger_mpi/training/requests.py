"""What asks for a checkpoint or a stop, and when a checkpoint is due.

Signals and the STOP file reach ranks at different times, so a request is only a flag that
the next step's fused allreduce sums: every rank sees the same request at the same step.
"""

import signal
from pathlib import Path

from granger_mpi.checkpoint import CheckpointPolicy


class RequestSource:
    """Signals (SIGUSR1: save; SIGTERM: save and stop), the STOP file and timed saves, as
    the two flags a step sends (``take``). Only the writer rank watches the file and the
    clock; a context manager, which puts the signal handlers back on exit."""

    def __init__(self, policy: CheckpointPolicy, stop_file: Path, *, watcher: bool):
        self.policy = policy
        self.stop_file = stop_file
        self.watcher = watcher
        self.save = False
        self.stop = False
        self._old = {}

    def __enter__(self):
        def on_usr1(signum, frame):
            self.save = True

        def on_term(signum, frame):
            self.save = self.stop = True
        for signum, handler in ((signal.SIGUSR1, on_usr1), (signal.SIGTERM, on_term)):
            self._old[signum] = signal.signal(signum, handler)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._old.items():
            signal.signal(signum, handler)
        self._old.clear()

    def take(self) -> tuple[bool, bool]:
        """``(save, stop)`` asked for and not yet served. They stay set until a checkpoint
        is written, so a step redone after a rank failure asks again."""
        if self.watcher:
            if self.policy.timed_save_due():
                self.save = True
            if self.stop_file.exists():
                self.save = self.stop = True
        return self.save, self.stop

    def served(self) -> None:
        """A checkpoint was written: a USR1 that reached this rank a step later than the
        others is served by it too (left set, it would ask for a second one at once)."""
        self.save = False

    def stop_honoured(self) -> None:
        """The run stops now: a resumed run must not find the STOP file and stop again."""
        self.stop = False
        if self.watcher and self.stop_file.exists():
            self.stop_file.unlink()
