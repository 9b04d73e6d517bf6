"""The partition rule: every row exactly once per epoch, batches independent of P, each rank
owning one contiguous region of the file, plans in O(rows owned)."""

import numpy as np
import pytest

from granger_mpi.data import partition

SHAPES = [(1000, 64), (1000, 100), (7, 3), (10, 10), (5, 8), (999, 1)]


def plan(n_rows, global_batch, seed=11, epoch=0, window=7, **where):
    return partition.EpochPlan.make(n_rows, global_batch, seed, epoch, window=window, **where)


@pytest.mark.parametrize("n_rows,global_batch", SHAPES)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_every_row_exactly_once_per_epoch(n_rows, global_batch, world_size):
    if world_size > global_batch:
        with pytest.raises(ValueError, match="cannot share"):
            plan(n_rows, global_batch, world_size=world_size)
        return
    for epoch in (0, 1):
        plans = [plan(n_rows, global_batch, epoch=epoch, world_size=world_size, rank=r)
                 for r in range(world_size)]
        seen = np.concatenate([p.rows(step) for step in range(plans[0].steps) for p in plans])
        assert np.array_equal(np.sort(seen), np.arange(n_rows))
        assert plans[0].steps == -(-n_rows // global_batch)


def test_global_batch_is_the_same_set_at_every_world_size():
    whole = plan(1000, 64, seed=2, epoch=3)
    for step in range(whole.steps):
        batch = whole.rows(step)
        assert batch.size == whole.batch_len(step)
        for world_size in (1, 2, 3, 4, 5):
            parts = [plan(1000, 64, seed=2, epoch=3, world_size=world_size, rank=r).rows(step)
                     for r in range(world_size)]
            assert np.array_equal(np.concatenate(parts), batch)
            assert all(np.array_equal(p, whole.rank_rows(step, world_size, r))
                       for r, p in enumerate(parts))
            if step < whole.steps - 1:   # full steps: one row per lane, lanes split evenly
                sizes = [p.size for p in parts]
                assert max(sizes) - min(sizes) <= 1


def test_each_rank_reads_only_its_contiguous_region():
    for world_size in (1, 2, 3, 5):
        regions = [partition.rank_region(1003, 64, world_size, r) for r in range(world_size)]
        assert regions[0][0] == 0 and regions[-1][1] == 1003
        assert all(regions[r][1] == regions[r + 1][0] for r in range(world_size - 1))
        for r, (lo, hi) in enumerate(regions):
            p = plan(1003, 64, world_size=world_size, rank=r)
            rows = np.concatenate([p.rows(s) for s in range(p.steps)])
            assert rows.min() >= lo and rows.max() < hi and rows.size == hi - lo
            assert p.order.nbytes <= (hi - lo + p.order.shape[0]) * 8   # O(rows owned)


def test_remainder_step_is_smaller_and_spread_over_the_lanes():
    p = plan(1000, 64, seed=0)
    assert [p.rows(s).size for s in range(p.steps)] == [64] * 15 + [40]
    long_lanes = np.flatnonzero(p.order[:, -1] >= 0)   # the 40 lanes one row longer
    assert long_lanes.size == 40 and np.diff(long_lanes).max() <= 2


def test_a_lane_visits_its_windows_one_after_another():
    """Streaming reads one window per lane at a time: each window's rows are consecutive
    in the lane's order, and windows and rows inside them are shuffled."""
    order = partition.lane_order(100_000, 4, 1, 100, seed=3, epoch=0)
    blocks = order // 100
    runs = 1 + np.count_nonzero(blocks[1:] != blocks[:-1])
    assert runs == np.unique(blocks).size                 # each window entered once
    assert not np.all(np.diff(blocks[np.r_[True, blocks[1:] != blocks[:-1]]]) > 0)
    assert not np.all(np.diff(order[:100]) > 0)
    assert np.array_equal(np.sort(order), np.arange(25_000, 50_000))


def test_seed_and_epoch_change_the_order_deterministically():
    def rows(seed, epoch):
        return partition.rank_rows(500, 50, seed, epoch, 0, 2, 1, window=7)
    a = rows(7, 0)
    assert np.array_equal(a, rows(7, 0))
    assert not np.array_equal(a, rows(7, 1))
    assert not np.array_equal(a, rows(8, 0))


def test_batches_are_stratified_over_the_file():
    """On a class-sorted file every batch holds each class in its share of the file (the
    lanes), where a global shuffle's batches vary binomially."""
    n_rows, batch, classes = 10_000, 100, 10
    labels = np.arange(n_rows) * classes // n_rows
    p = plan(n_rows, batch, window=50)
    counts = np.array([np.bincount(labels[p.rows(s)], minlength=classes) for s in range(p.steps)])
    assert counts.min() == counts.max() == batch // classes
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(n_rows).reshape(-1, batch)
    assert np.bincount(labels[shuffled[0]], minlength=classes).std() > 0


def test_planning_a_billion_rows_is_cheap():
    """One rank of 1024 plans an epoch of 10^9 rows in O(rows owned) memory."""
    p = partition.EpochPlan.make(10**9, 1024, 1, 0, window=83, world_size=1024, rank=1000)
    assert p.order.shape == (1, 976_563) and p.order.nbytes < 10 << 20
    lo, hi = partition.rank_region(10**9, 1024, 1024, 1000)
    assert p.rows(0)[0] >= lo and p.rows(0)[0] < hi


def test_rank_bounds_are_balanced_and_contiguous():
    for length in range(0, 20):
        for world_size in range(1, 6):
            bounds = [partition.rank_bounds(length, world_size, r) for r in range(world_size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == length
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world_size - 1))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        plan(0, 4)
    with pytest.raises(IndexError):
        plan(10, 4).rows(3)
