"""The step model (``granger-mpi model --steps``): its terms add up as documented, its
buckets are the trainer's, overlap hides exactly what backward leaves room for, and the
command reads the shipped measurements."""

import csv

import numpy as np
import pytest
from mpi4py import MPI

from conftest import ROOT, granger
from granger_mpi.model.models import Model
from granger_mpi.tools import scaling, stepmodel
from granger_mpi.training.step import StepRunner

SIZES = (784, 512, 256, 10)
# Kernel seconds at 64/128/256 rows: linear in rows, so interpolation is exact.
KERNELS = {(1, 1): [(64, 1e-3), (128, 2e-3), (256, 4e-3)], (2, 1): [(64, 0.8e-3), (256, 3.2e-3)]}
NO_TABLES = {"model": {"alpha": 1e-5, "beta": 1e-9, "gamma": 1e-10}, "tables": {}}


def allreduce_rows(ranks, seconds_per_byte):
    """A benchmark table in which every algorithm takes ``seconds_per_byte`` per byte."""
    return [(a, ranks, n, n * seconds_per_byte) for a in ("native", "ring", "rhd", "rd", "shm", "hierarchical")
            for n in (1 << 16, 1 << 18, 1 << 20, 1 << 22)]


def test_one_rank_is_the_kernel_plus_the_fixed_cost():
    model = stepmodel.StepModel(SIZES, 256, KERNELS, fixed_s=0.5e-3, calibration=NO_TABLES)
    p = model.predict(stepmodel.Setting(1, 1, cores=2, threads=1))
    assert p.step == pytest.approx(4.5e-3) and p.exchange_left == 0 and not p.buckets
    # 2 ranks of 2 threads on 2 cores take turns: compute twice as long, fixed cost too.
    shared = stepmodel.Setting(2, 1, cores=2, threads=2)
    assert shared.stretch == 2
    p = model.predict(shared, allreduce_rows(2, 1e-9))
    assert p.compute == pytest.approx(2 * (3.2e-3 / 2 + 0.5e-3))


def test_a_kernel_measured_beside_its_neighbours_is_taken_as_it_is():
    kernels = {**KERNELS, (1, 4): [(64, 3e-3), (256, 12e-3)]}
    model = stepmodel.StepModel(SIZES, 256, kernels, calibration=NO_TABLES)
    setting = stepmodel.Setting(4, 4, cores=2, kernels=1, threads=1)     # 4 emulated hosts, 2 cores
    assert model.kernel_seconds(64, setting) == pytest.approx(3e-3)      # not 2 x 1e-3


def test_buckets_are_the_trainers():
    model = stepmodel.StepModel(SIZES, 256, KERNELS, calibration=NO_TABLES, bucket_mb=1.0)
    mlp = Model("mlp", SIZES, "relu", "classification")
    runner = StepRunner(MPI.COMM_SELF, mlp, None, None, micro_batches=1, sharded=False,
                        shared_memory=False, ranks_per_node=None, bucket_bytes=1 << 20)
    assert model.buckets(stepmodel.Setting(2, 2, cores=2)) == runner.buckets
    assert len(runner.buckets) == 3
    auto_buckets = stepmodel.StepModel(SIZES, 256, KERNELS, calibration=NO_TABLES)
    assert auto_buckets.buckets(stepmodel.Setting(2, 1, cores=2)) == [(0, mlp.layout.size + 5)]
    assert auto_buckets.buckets(stepmodel.Setting(2, 2, cores=2)) == runner.buckets


def test_overlap_hides_the_buckets_backward_leaves_room_for():
    model = stepmodel.StepModel(SIZES, 256, KERNELS, calibration=NO_TABLES)
    rows = allreduce_rows(2, 1e-9)
    serial = model.predict(stepmodel.Setting(2, 2, cores=1, kernels=2, threads=1), rows)   # no core free
    assert not serial.overlapped and serial.overlap_fraction == 0
    assert serial.exchange_left == pytest.approx(sum(s for _, _, s in serial.buckets))
    free = model.predict(stepmodel.Setting(2, 2, cores=2, kernels=2, threads=1), rows)     # a core free
    assert free.overlapped and free.compute == pytest.approx(serial.compute)
    # By hand: backward of layers 3 and 2 finishes the first bucket (layers 3, 2), which
    # starts then; the two halves of layer 1 only when backward has ended.
    forward, backward = scaling.layer_flops(SIZES)
    per_flop = 2e-3 / (forward + sum(backward))
    first_ready = (forward + backward[0] + backward[1]) * per_flop
    backward_end = 2e-3
    (_, _, t0), (_, _, t1), (_, _, t2) = free.buckets
    end = max(max(first_ready + t0, backward_end) + t1, backward_end) + t2
    assert free.exchange_left == pytest.approx(end - backward_end)
    assert 0 < free.overlap_fraction < 1


def test_auto_decides_as_the_run_does():
    """With a calibration table the model takes its algorithm per bucket size, as auto."""
    table = {"bytes": [1 << 19, 1 << 20, 1 << 21],
             "median_us": {"native": [9, 9, 9], "ring": [1, 9, 9], "rhd": [9, 1, 1], "rd": [9, 9, 9],
                           "hierarchical": [9, 9, 9]}}
    calibration = {"model": NO_TABLES["model"], "tables": {"P2-net": table}}
    model = stepmodel.StepModel(SIZES, 256, KERNELS, calibration=calibration)
    p = model.predict(stepmodel.Setting(2, 2, cores=1, kernels=2, threads=1), allreduce_rows(2, 1e-9))
    assert [a for _, a, _ in p.buckets] == ["ring", "rhd", "rhd"]      # 536 KB, then 804 KB twice


def test_the_measured_table_wins_inside_its_sizes_and_the_fit_outside():
    rows = [("ring", 2, n, 5e-6 + n * 1e-9) for n in (1 << 16, 1 << 20)]
    inside = stepmodel.StepModel.allreduce_seconds(rows, "ring", 1 << 18, 2)
    assert (5e-6 + (1 << 16) * 1e-9) < inside < (5e-6 + (1 << 20) * 1e-9)
    rows += [("rhd", 2, n, 5e-6 + n * 1e-9) for n in (1 << 16, 1 << 20)]
    outside = stepmodel.StepModel.allreduce_seconds(rows, "ring", 1 << 24, 2)
    assert outside == pytest.approx(2 * 5e-6 + (1 << 24) * 1e-9, rel=0.05)


def test_the_command_compares_the_shipped_measurements(tmp_path):
    run = granger("model", "--sizes", "784,512,256,10", "--steps",
                  *[ROOT / "docs" / "bench" / f"ddp_{t}.csv" for t in ("1node", "2hosts", "4hosts")],
                  timeout=120)
    assert run.returncode == 0, run.output
    lines = run.stdout.splitlines()
    assert "fitted to the one-node runs (P = 1, 2)" in lines[0], run.output
    for setting in ("P=1, one node", "P=2, one node", "P=2, 2 emulated hosts", "P=4, 4 emulated hosts"):
        assert any(line.startswith(setting) and line.rstrip().endswith("%") for line in lines), run.output
    bad = tmp_path / "bad.csv"
    with open(bad, "w", newline="") as f:
        csv.writer(f).writerows([["impl", "ranks"], ["granger-mpi", "2"]])
    run = granger("model", "--sizes", "784,512,256,10", "--steps", bad, timeout=60)
    assert run.returncode == 2 and "hosts, link and steps" in run.stderr, run.output


def test_loglog_interpolates_and_extends():
    points = [(64, 1.0), (256, 4.0)]
    assert stepmodel._loglog(points, 128) == pytest.approx(2.0)
    assert stepmodel._loglog(points, 512) == pytest.approx(8.0)
    assert stepmodel._loglog(points, 32) == pytest.approx(0.5)
    assert np.isfinite(stepmodel._loglog([(64, 1.0)], 128))


def test_auto_sends_large_messages_across_nodes_by_ring_without_a_table():
    """Pairwise exchanges lose to ring's one-way streams on TCP links (docs/performance.md):
    without a calibration table, auto takes ring for large messages across nodes at P > 2."""
    from granger_mpi.collectives import auto
    big, small = 1 << 20, 4096
    rhd_wins = {"model": {"alpha": 1e-4, "beta": 1e-9, "gamma": 0.0}, "tables": {}}   # ring: more messages
    assert auto.decide(rhd_wins, big, 4, one_node=False, candidates=("ring", "rhd"))[0] == "ring"
    assert auto.decide(rhd_wins, big, 4, one_node=True)[2] == "alpha-beta-gamma model"   # one node
    assert auto.decide(rhd_wins, big, 4, one_node=False)[0] == "ring"
    assert auto.decide(rhd_wins, big, 8, one_node=False)[0] == "ring"
    for args in ((big, 2, False), (small, 4, False)):        # ring is pairwise at P = 2; small: latency
        assert auto.decide(rhd_wins, *args)[2] == "alpha-beta-gamma model", args
    assert auto.decide(rhd_wins, big, 4, False, candidates=("native", "rhd"))[0] != "ring"
    table = {"bytes": [big], "median_us": {"ring": [9.0], "rhd": [1.0]}}     # a measurement wins
    assert auto.decide({"tables": {"P4-net": table}}, big, 4, one_node=False)[0] == "rhd"
