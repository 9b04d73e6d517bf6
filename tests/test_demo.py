"""``scripts/demo``, the first thing a new user runs: it must show a rank dying and the job
carrying on (a spare taking its place, then a shrink), and end with exit 0."""

import h5py
import numpy as np

from conftest import ROOT, run_command


def test_the_demo_kills_two_ranks_and_finishes():
    run = run_command([ROOT / "scripts" / "demo"], timeout=420, cwd=ROOT)
    assert run.returncode == 0, run.output
    out = run.stdout + run.stderr
    assert "spare world rank 4 takes the place of world rank 1" in out, run.output
    assert "3 continue from step" in out, run.output
    assert "verify: ok, every checksum matches" in out, run.output
    run_dir = ROOT / "runs" / "demo" / "run"
    assert (run_dir / "COMPLETE").exists() and (run_dir / "plots" / "recoveries.png").exists()
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        assert list(f["events/spares_used"][...]) == [1, 0]
        assert list(f["events/world_size"][...]) == [4, 3]
        steps = f["step"][...]
        assert len(steps) == 3910 and (np.diff(steps) == 1).all()   # each step once, both failures
