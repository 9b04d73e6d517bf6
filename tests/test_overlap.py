"""The bucketed exchange, overlapped with backward: its plan, its sums under real mpirun,
and whole training runs (bitwise the same as the same buckets summed after backward)."""

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import MPIRUN, PYTHON, mpirun, read_params, run_command, write_job
from granger_mpi.collectives.overlap import plan
from test_fault import completion, ulfm_train

PROGRAMS = Path(__file__).parent / "programs"


@pytest.mark.parametrize("boundaries,length,cap", [
    ([9000, 4000, 1200, 0], 9005, 700), ([9000, 4000, 1200, 0], 9005, 3000),
    ([9000, 4000, 1200, 0], 9005, 10**6), ([0], 1, 1), ([0], 10, 3), ([50, 49, 0], 60, 10)])
def test_buckets_cover_the_buffer_from_its_end_within_the_size(boundaries, length, cap):
    buckets = plan(boundaries, length, cap)
    assert buckets[0][1] == length and buckets[-1][0] == 0
    assert all(hi == lo2 for (lo2, _), (_, hi) in zip(buckets[:-1], buckets[1:]))   # contiguous
    assert all(0 < hi - lo <= cap for lo, hi in buckets)


def test_parts_are_grouped_until_the_bucket_is_full_and_long_parts_cut_evenly():
    assert plan([9000, 4000, 1200, 0], 9005, 10**6) == [(0, 9005)]
    assert plan([9000, 4000, 1200, 0], 9005, 5005) == [(4000, 9005), (0, 4000)]
    assert plan([9000, 4000, 1200, 0], 9005, 3000) == [(9000, 9005), (6500, 9000), (4000, 6500),
                                                       (1200, 4000), (0, 1200)]
    with pytest.raises(ValueError, match="at least one element"):
        plan([0], 10, 0)


@pytest.mark.parametrize("ranks", [2, 4])
def test_overlapped_buckets_sum_bitwise_as_after_backward_with_every_algorithm(ranks):
    run = run_command([*MPIRUN, "-n", str(ranks), PYTHON, PROGRAMS / "check_overlap.py"], timeout=240)
    assert run.returncode == 0, run.output
    assert f"checked P={ranks}: 0 failure(s)" in run.stdout, run.output


def _train(small_dataset, tmp_path, name, ranks, *, train=None, output=None, **collectives):
    run_dir = tmp_path / name
    job = write_job(tmp_path / f"{name}.toml", dataset=small_dataset, run_dir=run_dir,
                    model={"kind": "mlp", "hidden": [64, 32]},
                    train={"global_batch": 64, "epochs": 1, "seed": 3, **(train or {})},
                    output=output or {}, collectives=collectives)
    run = mpirun(ranks, "train", job, timeout=180)
    assert run.returncode == 0, run.output
    return run, read_params(run_dir / "model.h5")


@pytest.mark.parametrize("ranks,algorithm,accumulation", [(3, "ring", 1), (2, "auto", 2)])
def test_training_with_overlap_is_bitwise_the_same_buckets_after_backward(
        small_dataset, tmp_path, ranks, algorithm, accumulation):
    # 3,044 parameters (+ 5 statistics) in buckets of at most 1,048 elements: 4 buckets, the
    # output layer alone, the middle one cut in two, the first one.
    common = dict(algorithm=algorithm, bucket_mb=0.004, train={"accumulation_steps": accumulation})
    overlapped, params = _train(small_dataset, tmp_path, "on", ranks, overlap=True, **common)
    after, params_after = _train(small_dataset, tmp_path, "off", ranks, overlap=False, **common)
    assert "in 4 bucket(s) of at most 4,1" in overlapped.stdout and "overlapped with backward" in overlapped.stdout
    assert "after backward" in after.stdout
    assert params.tobytes() == params_after.tobytes()
    _, whole = _train(small_dataset, tmp_path, "whole", ranks, bucket_mb=0, algorithm=algorithm,
                      train={"accumulation_steps": accumulation})
    np.testing.assert_allclose(params, whole, rtol=1e-5, atol=1e-6)   # other buckets, other order


def test_a_rank_killed_inside_a_bucket_is_one_rank_failure(small_dataset, tmp_path):
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "a.toml", dataset=small_dataset, run_dir=run_dir,
                    model={"kind": "mlp", "hidden": [64, 32]}, train={"global_batch": 64, "epochs": 2, "seed": 3},
                    collectives={"algorithm": "ring", "bucket_mb": 0.004})
    run, _ = ulfm_train(3, job, "rank=1,step=20,mode=kill9,at=allreduce", tmp_path=tmp_path)
    record = completion(run_dir, run)
    assert record["world_size"] == 2 and record["lost_world_ranks"] == [1]
    assert "during the allreduce (ring)" in run.stdout, run.stdout


def test_the_timeline_shows_each_layer_and_bucket_of_the_traced_steps(small_dataset, tmp_path):
    run, _ = _train(small_dataset, tmp_path, "traced", 2, algorithm="ring", bucket_mb=0.004, overlap=True,
                    output={"trace_steps": 3, "trace_first_step": 5})
    assert "timeline of steps 5..7: " in run.stdout, run.stdout
    events = json.loads((tmp_path / "traced" / "trace.json").read_text())["traceEvents"]
    names = {(e["pid"], e["args"]["name"]) for e in events if e["name"] == "process_name"}
    assert names == {(0, "rank 0 (world rank 0)"), (1, "rank 1 (world rank 1)")}
    for rank in (0, 1):
        spans = [e for e in events if e["ph"] == "X" and e["pid"] == rank]
        compute = [e["name"] for e in spans if e["tid"] == 0]
        assert compute == ["forward", "backward 3", "backward 2", "backward 1",
                           "waiting for the exchange", "optimizer"] * 3
        buckets = [e for e in spans if e["tid"] == 1]
        assert [e["name"] for e in buckets] == [f"bucket {k}" for k in range(4)] * 3
        assert sum(e["args"]["bytes"] for e in buckets) == 3 * (3044 + 5) * 4
        # Causality: bucket 0 (output layer, statistics) starts after backward 3 has ended.
        made = [e for e in spans if e["name"] == "backward 3"]
        first = [e for e in buckets if e["name"] == "bucket 0"]
        assert all(b["ts"] >= m["ts"] + m["dur"] - 1 for m, b in zip(made, first))


@pytest.mark.parametrize("ranks", [1, 2])
def test_overlap_auto_uses_a_thread_only_where_a_core_is_free_for_it(small_dataset, tmp_path, ranks):
    """One compute thread per rank: the exchange thread needs a second core per rank."""
    from granger_mpi.mpi.threads import usable_cpus
    run, _ = _train(small_dataset, tmp_path, f"auto{ranks}", ranks, algorithm="ring", bucket_mb=0.004,
                    train={"threads_per_rank": 1, "max_steps": 3})
    if usable_cpus() >= 2 * ranks:
        assert "overlapped with backward" in run.stdout, run.stdout
    else:
        assert "after backward (no core free for an exchange thread)" in run.stdout, run.stdout
