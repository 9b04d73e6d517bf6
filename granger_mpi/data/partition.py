"""Which rows each rank uses at each step: a pure function of the job, never of timing.

The rule (``RULE`` = 2, recorded in checkpoints):

* The file's rows are cut into ``lanes`` contiguous blocks, lane ``j`` holding rows
  ``[j * n_rows // lanes, (j + 1) * n_rows // lanes)``; ``lanes`` is the global batch, so it
  does not depend on the number of ranks. Rank ``r`` of ``P`` owns a contiguous range of
  lanes (``rank_bounds(lanes, P, r)``), hence one contiguous region of the file: it reads
  and holds only those rows.
* Each epoch, every lane is visited in its own shuffled order, and step ``s`` takes the
  ``s``-th row of every lane's order: each global batch holds one row from every lane (a
  sample stratified over the whole file). Lanes are ``n_rows // lanes`` or one more rows
  long; the longer ones give the last, partial step of an epoch its rows, so every row is
  used exactly once per epoch.
* A lane's order is windowed, so that a rank whose share does not fit in memory can stream
  it: the file is cut into windows of ``window`` rows (a fixed grid, the same as the blocks
  a dataset's checksums cover); a lane visits its windows in a shuffled order and the rows
  of each window in a shuffled order. Both shuffles are sorts by a keyed 64-bit hash of
  ``(seed, epoch, lane, window)`` and ``(seed, epoch, row)``, so planning an epoch takes
  O(rows owned) memory and time, whatever the file's size.

The global batch of a step depends on ``(n_rows, global_batch, window, seed, epoch, step)``
only, so runs at different world sizes sum the same per-row gradients and differ only in
floating-point summation order; a resume at another world size, or survivors after a rank
failure, take over the missing rows by planning with the new world size.
"""

from dataclasses import dataclass

import numpy as np

RULE = 2                    # version of the rule above; 1 was a global permutation of all rows
WINDOW_BYTES = 256 << 10    # rows per window: about this many bytes of a row as stored


def steps_per_epoch(n_rows, global_batch):
    """Number of steps in one epoch: ``ceil(n_rows / global_batch)``."""
    return -(-n_rows // global_batch)


def window_rows(row_bytes):
    """Rows per window (and per checksum block) for rows of ``row_bytes`` bytes as stored."""
    return int(max(1, WINDOW_BYTES // max(1, row_bytes)))


def rank_bounds(length, world_size, rank):
    """``(lo, hi)`` of ``rank``'s contiguous piece of ``length`` items; the pieces' lengths
    differ by at most one, the first ``length % world_size`` ranks taking the longer ones."""
    base, extra = divmod(length, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def lane_start(n_rows, lanes, lane):
    """First row of ``lane`` (``lane == lanes`` gives ``n_rows``)."""
    return lane * n_rows // lanes


def rank_region(n_rows, lanes, world_size, rank):
    """``(lo, hi)``: the rows of the lanes ``rank`` owns, one contiguous range of the file."""
    a, b = rank_bounds(lanes, world_size, rank)
    return lane_start(n_rows, lanes, a), lane_start(n_rows, lanes, b)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x):
    """SplitMix64's finalizer on a uint64 array: a bijection that scatters every bit."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, np.uint64) + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _key(*parts):
    """One 64-bit key from non-negative integers."""
    k = np.zeros((), np.uint64)
    for part in parts:
        k = _mix(k ^ np.uint64(part))
    return k


def lane_order(n_rows, lanes, lane, window, seed, epoch):
    """The rows of ``lane`` in the order ``epoch`` visits them (see the module rule)."""
    lo, hi = lane_start(n_rows, lanes, lane), lane_start(n_rows, lanes, lane + 1)
    rows = np.arange(lo, hi, dtype=np.int64)
    epoch_key = _key(seed, epoch)
    window_keys = _mix(_key(epoch_key, lane) ^ (rows // window).astype(np.uint64))
    row_keys = _mix(epoch_key ^ rows.astype(np.uint64))
    return rows[np.lexsort((row_keys, window_keys))]   # by window key, then row key


@dataclass(frozen=True)
class EpochPlan:
    """The rows of one epoch for the ranks owning lanes ``[lane_lo, lane_hi)``.

    ``order[i, s]`` is the row lane ``lane_lo + i`` gives step ``s``, -1 past the lane's
    end (only at the last, partial step). O(rows owned) memory.
    """

    n_rows: int
    global_batch: int
    window: int
    lane_lo: int
    lane_hi: int
    order: np.ndarray

    @classmethod
    def make(cls, n_rows, global_batch, seed, epoch, *, window, world_size=1, rank=0):
        """The plan of ``epoch`` for ``rank`` of ``world_size`` (default: the whole batch)."""
        if n_rows < 1 or global_batch < 1 or window < 1:
            raise ValueError(f"need n_rows, global_batch and window >= 1, got "
                             f"{n_rows}, {global_batch}, {window}")
        if world_size > global_batch:
            raise ValueError(f"{world_size} ranks cannot share {global_batch} lanes")
        a, b = rank_bounds(global_batch, world_size, rank)
        order = np.full((b - a, steps_per_epoch(n_rows, global_batch)), -1, np.int64)
        for i, lane in enumerate(range(a, b)):
            rows = lane_order(n_rows, global_batch, lane, window, seed, epoch)
            order[i, :rows.size] = rows
        return cls(n_rows, global_batch, window, a, b, order)

    @property
    def steps(self):
        """Number of steps in this epoch."""
        return self.order.shape[1]

    def batch_len(self, step):
        """Rows in the global batch of ``step`` (``global_batch``, less at the last step)."""
        return min(self.global_batch, self.n_rows - step * self.global_batch)

    def lanes_at(self, step):
        """Indices (into this plan's lanes) of the lanes that give ``step`` a row."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} is outside the epoch's {self.steps} steps")
        column = self.order[:, step]
        return np.flatnonzero(column >= 0)

    def rows(self, step):
        """This plan's rows of ``step``, ascending (lanes are in file order)."""
        return self.order[self.lanes_at(step), step]

    def rank_rows(self, step, world_size, rank):
        """Rows ``rank`` of ``world_size`` uses at ``step``, from a plan of all lanes."""
        a, b = rank_bounds(self.global_batch, world_size, rank)
        column = self.order[a - self.lane_lo:b - self.lane_lo, step]
        return column[column >= 0]


def rank_rows(n_rows, global_batch, seed, epoch, step, world_size, rank, *, window):
    """Sorted row numbers that ``rank`` uses at ``step`` of ``epoch`` (see the module rule)."""
    plan = EpochPlan.make(n_rows, global_batch, seed, epoch, window=window,
                          world_size=world_size, rank=rank)
    return plan.rows(step)
