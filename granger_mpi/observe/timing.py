"""Where each rank's time goes: data, compute, communication, checkpoint, the rest, and
waiting.

Every rank adds up its own seconds per phase; every ``[output].timing_every_steps`` steps
(and at the end) one ``Gather`` brings the window's totals to rank 0, which records them
per world rank. That is one small collective per window, not per step: the per-step
allreduce already synchronises the ranks, so the gather waits for nobody.

Waiting is not timed directly (a rank cannot tell, inside an allreduce, whether it is
moving bytes or waiting for a slower peer); it is derived: the rank whose communication
took least in the window waited least, so ``wait = comm - min over ranks of comm``. A
straggler (slow data, a busy core) shows as the others' wait.
"""

import time

import numpy as np

# other: rank 0's metrics and progress line, status updates, the timing report itself.
PHASES = ("data", "compute", "comm", "checkpoint", "other")
DATA, COMPUTE, COMM, CHECKPOINT, OTHER = range(len(PHASES))
# Written to metrics.h5 (group ``ranks``) and to reporters, in seconds per window.
COLUMNS = tuple(f"{phase}_s" for phase in PHASES) + ("wait_s",)


class PhaseTimer:
    """This rank's seconds per phase since the last ``gather``."""

    def __init__(self):
        self.totals = np.zeros(len(PHASES))
        self.steps = 0
        self._mark = time.perf_counter()

    def start(self):
        """Start timing the next phase from now."""
        self._mark = time.perf_counter()

    def lap(self, phase):
        """Add the time since the last mark to ``phase``; the next phase starts now."""
        now = time.perf_counter()
        self.totals[phase] += now - self._mark
        self._mark = now

    def gather(self, comm, idents, world_size):
        """Collective: the window's totals of every rank, on rank 0; resets the window.

        Returns, on rank 0, a dict: ``steps`` (in the window) and one list per ``COLUMNS``
        entry with a value per world rank (NaN for ranks no longer in ``comm``); None on
        the other ranks. ``idents``: the world rank of each rank of ``comm``.
        """
        rank = comm.Get_rank()
        mine = np.append(self.totals, float(self.steps))
        every = np.empty((comm.Get_size(), mine.size)) if rank == 0 else None
        comm.Gather(mine, every, root=0)
        self.totals[:] = 0
        self.steps = 0
        if rank != 0:
            return None
        table = np.full((world_size, len(COLUMNS)), np.nan)
        table[idents, :len(PHASES)] = every[:, :len(PHASES)]
        comm_s = table[:, COMM]
        table[:, len(PHASES)] = comm_s - np.nanmin(comm_s)
        row = {"steps": int(every[0, -1])}
        row.update({name: table[:, k].tolist() for k, name in enumerate(COLUMNS)})
        return row
