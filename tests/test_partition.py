"""The partition rule: every row exactly once per epoch, batches independent of P."""

import numpy as np
import pytest

from granger_mpi.data import partition

SHAPES = [(1000, 64), (1000, 100), (7, 3), (10, 10), (5, 8), (999, 1)]


@pytest.mark.parametrize("n_rows,global_batch", SHAPES)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
def test_every_row_exactly_once_per_epoch(n_rows, global_batch, world_size):
    for epoch in (0, 1):
        plan = partition.EpochPlan.make(n_rows, global_batch, seed=11, epoch=epoch)
        seen = np.concatenate([plan.rows(step, world_size, rank)
                               for step in range(plan.steps) for rank in range(world_size)])
        assert np.array_equal(np.sort(seen), np.arange(n_rows))
        assert plan.steps == -(-n_rows // global_batch)


def test_global_batch_is_the_same_set_at_every_world_size():
    plan = partition.EpochPlan.make(1000, 64, seed=2, epoch=3)
    for step in range(plan.steps):
        batch = plan.batch(step)
        for world_size in (1, 2, 3, 4, 5):
            parts = [plan.rows(step, world_size, rank) for rank in range(world_size)]
            assert np.array_equal(np.concatenate(parts), batch)
            sizes = [p.size for p in parts]
            assert max(sizes) - min(sizes) <= 1
            assert sizes == sorted(sizes, reverse=True)  # the first ranks take the extra rows


def test_remainder_step_is_smaller_and_nothing_is_dropped():
    plan = partition.EpochPlan.make(1000, 64, seed=0, epoch=0)
    assert [plan.batch(s).size for s in range(plan.steps)] == [64] * 15 + [40]


def test_seed_and_epoch_change_the_order_deterministically():
    a = partition.rank_rows(500, 50, 7, 0, 0, 2, 1)
    assert np.array_equal(a, partition.rank_rows(500, 50, 7, 0, 0, 2, 1))
    assert not np.array_equal(a, partition.rank_rows(500, 50, 7, 1, 0, 2, 1))
    assert not np.array_equal(a, partition.rank_rows(500, 50, 8, 0, 0, 2, 1))


def test_rank_bounds_are_balanced_and_contiguous():
    for length in range(0, 20):
        for world_size in range(1, 6):
            bounds = [partition.rank_bounds(length, world_size, r) for r in range(world_size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == length
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(world_size - 1))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        partition.EpochPlan.make(0, 4, 0, 0)
    with pytest.raises(IndexError):
        partition.EpochPlan.make(10, 4, 0, 0).batch(3)
