"""``CheckpointPolicy``: whether a step is due for a checkpoint."""

import time
from pathlib import Path

from granger_mpi.config import CheckpointConfig


class CheckpointPolicy:
    """Whether a step is due for a checkpoint: ``[checkpoint]`` of the job, and the clock."""

    def __init__(self, ckpt: CheckpointConfig, total_steps: int):
        self.every_steps = ckpt.every_steps
        self.every_seconds = ckpt.every_seconds
        self.at_end = ckpt.at_end
        self.total_steps = total_steps
        self.last_save = time.perf_counter()

    def saved(self) -> None:
        """A checkpoint was just written: the clock of timed saves starts again."""
        self.last_save = time.perf_counter()

    def timed_save_due(self) -> bool:
        return self.every_seconds is not None and time.perf_counter() - self.last_save >= self.every_seconds

    def due(self, done: int, requested: bool) -> bool:
        """After ``done`` steps: a save asked for, or a periodic one; the last step has its own."""
        periodic = self.every_steps is not None and done % self.every_steps == 0
        return (requested or periodic) and done < self.total_steps

    def due_at_end(self, done: int, start_step: int, saved: Path | None, file_name) -> bool:
        """A final checkpoint, unless the run did no step or the last one saved already."""
        return self.at_end and done > start_step and (saved is None or saved.name != file_name(done))
