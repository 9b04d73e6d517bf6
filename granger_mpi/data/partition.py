"""Which rows each rank uses at each step: a pure function of the job, never of timing.

The rule:

* An epoch visits all ``n_rows`` rows in the order of a permutation seeded by
  ``(seed, epoch)``; step ``s`` of the epoch takes the ``global_batch`` rows at positions
  ``[s * global_batch, (s + 1) * global_batch)`` of that order. The last step of an epoch
  takes the remainder (``n_rows mod global_batch`` rows, when that is not zero), so every
  row is used exactly once per epoch: none dropped, none repeated.
* The rows of a global batch are sorted by row number and cut into ``world_size``
  contiguous pieces whose lengths differ by at most one; the first ``len % world_size``
  ranks get one row more. Sorting first makes each rank's reads as contiguous as the
  shuffle allows.

The global batch (the set of rows a step uses) depends on ``(n_rows, global_batch, seed,
epoch, step)`` only, so runs at different world sizes sum the same per-row gradients and
differ only in floating-point summation order.
"""

from dataclasses import dataclass

import numpy as np


def steps_per_epoch(n_rows, global_batch):
    """Number of steps in one epoch: ``ceil(n_rows / global_batch)``."""
    return -(-n_rows // global_batch)


def epoch_order(n_rows, seed, epoch):
    """The permutation of ``range(n_rows)`` an epoch visits rows in."""
    rng = np.random.Generator(np.random.PCG64([seed, epoch]))
    return rng.permutation(n_rows)


def rank_bounds(batch_len, world_size, rank):
    """``(lo, hi)`` of ``rank``'s contiguous piece of a batch of ``batch_len`` rows."""
    base, extra = divmod(batch_len, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


@dataclass(frozen=True)
class EpochPlan:
    """The row order of one epoch, computed once and asked for each step's rows."""

    n_rows: int
    global_batch: int
    order: np.ndarray

    @classmethod
    def make(cls, n_rows, global_batch, seed, epoch):
        """The plan of ``epoch`` for a dataset of ``n_rows`` rows."""
        if n_rows < 1 or global_batch < 1:
            raise ValueError(f"need n_rows >= 1 and global_batch >= 1, got {n_rows}, {global_batch}")
        return cls(n_rows, global_batch, epoch_order(n_rows, seed, epoch))

    @property
    def steps(self):
        """Number of steps in this epoch."""
        return steps_per_epoch(self.n_rows, self.global_batch)

    def batch(self, step):
        """Sorted row numbers of the global batch of ``step``."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} is outside the epoch's {self.steps} steps")
        start = step * self.global_batch
        return np.sort(self.order[start:start + self.global_batch])

    def rows(self, step, world_size, rank):
        """Sorted row numbers that ``rank`` of ``world_size`` uses at ``step``."""
        batch = self.batch(step)
        lo, hi = rank_bounds(batch.size, world_size, rank)
        return batch[lo:hi]


def rank_rows(n_rows, global_batch, seed, epoch, step, world_size, rank):
    """Sorted row numbers that ``rank`` uses at ``step`` of ``epoch`` (see the module rule)."""
    return EpochPlan.make(n_rows, global_batch, seed, epoch).rows(step, world_size, rank)
