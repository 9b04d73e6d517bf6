"""#26: ``[collectives].compression = "bf16"``: bfloat16 on the wire, float32 sums.

The kernels against a numpy rounding; the compressed ring under mpirun against a numpy
emulation of its schedule, bitwise; training with it: the same parameters on every rank
(the run's own end-of-training check), accuracy within 0.5 point of float32,
and the statistics still float32 (the loss printed is the float32 one).
"""

import json

import numpy as np
import pytest

from conftest import MPIRUN, PYTHON, mpirun, read_params, run_command, write_job
from granger_mpi.kernels import bf16
import reference

from test_overlap import PROGRAMS


def test_encoding_rounds_to_nearest_even_and_keeps_nan_and_infinity():
    ties = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF], np.uint32).view(np.float32)
    special = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 3.4e38, 1e-40], np.float32)
    signalling = np.array([0x7F800001], np.uint32).view(np.float32)     # NaN, tiny mantissa
    x = np.concatenate([ties, special, signalling,
                        np.random.default_rng(0).normal(scale=1e3, size=10_000).astype(np.float32)])
    wire = np.empty(x.size, np.uint16)
    bf16.encode(x, wire)
    decoded = np.empty_like(x)
    bf16.decode(wire, decoded)
    assert list(wire[:4]) == [0x3F80, 0x3F82, 0x3F81, 0x3F80]     # ties go to the even one
    finite = np.isfinite(x) & (np.abs(x) < 3e38)
    assert decoded[finite].tobytes() == reference.bf16_round(x[finite]).tobytes()
    assert np.isnan(decoded[[6, 11]]).all() and list(decoded[4:6]) == [np.inf, -np.inf]
    acc = np.full(x.size, 0.5, np.float32)
    bf16.add_decoded(wire, acc)
    assert acc[finite].tobytes() == (np.float32(0.5) + decoded[finite]).tobytes()


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_the_compressed_ring_is_bitwise_its_reference_on_every_rank(ranks):
    run = run_command([*MPIRUN, "-n", str(ranks), PYTHON, PROGRAMS / "check_compressed.py"], timeout=120)
    assert run.returncode == 0, run.output
    assert f"checked P={ranks}: 0 failure(s)" in run.stdout, run.output


def _train(small_dataset, tmp_path, name, **collectives):
    run_dir = tmp_path / name
    job = write_job(tmp_path / f"{name}.toml", dataset=small_dataset, run_dir=run_dir,
                    data={"test_path": str(small_dataset.with_name("small-test.h5"))},
                    model={"kind": "mlp", "hidden": [64, 32]},
                    train={"global_batch": 64, "epochs": 3, "seed": 3}, collectives=collectives)
    run = mpirun(2, "train", job, timeout=180)
    assert run.returncode == 0, run.output
    return run, run_dir


def test_training_in_bf16_agrees_on_every_rank_and_keeps_float32_accuracy(small_dataset, tmp_path):
    plain, plain_dir = _train(small_dataset, tmp_path, "f32", algorithm="ring", bucket_mb=0.004)
    packed, packed_dir = _train(small_dataset, tmp_path, "bf16", algorithm="ring", bucket_mb=0.004,
                                compression="bf16")
    assert "gradient in bf16 on the wire" in packed.stdout, packed.stdout
    # Statistics alone first (float32), then the 4 gradient buckets.
    assert "in 5 bucket(s)" in packed.stdout, packed.stdout
    theirs = json.loads((plain_dir / "COMPLETE").read_text())["test_accuracy"]
    ours = json.loads((packed_dir / "COMPLETE").read_text())["test_accuracy"]
    print(f"synthetic task, test accuracy: float32 {100 * theirs:.2f}%, bf16 {100 * ours:.2f}%")
    assert abs(ours - theirs) <= 0.005, (ours, theirs)
    params, params_f32 = read_params(packed_dir / "model.h5"), read_params(plain_dir / "model.h5")
    assert params.tobytes() != params_f32.tobytes()      # the compression did act
    # Every rank applied the same update: the run ends by comparing the ranks' parameters
    # (check_replicas_identical), which fails the run if they differ.


def test_compression_on_an_algorithm_other_than_the_ring_is_refused(small_dataset, tmp_path):
    job = write_job(tmp_path / "bad.toml", dataset=small_dataset, run_dir=tmp_path / "run",
                    collectives={"algorithm": "rhd", "compression": "bf16"})
    run = mpirun(1, "train", job, timeout=60)
    assert run.returncode == 2, run.output
    assert "[collectives].compression = 'bf16' runs on the ring" in run.output
