"""``granger-mpi model``: the fit recovers known alpha/beta/gamma; the command runs on the
shipped benchmark data and refuses bad arguments."""

import csv

import pytest

from conftest import ROOT, granger
from granger_mpi.tools import scaling


def test_fit_recovers_known_costs(tmp_path):
    truth = {"alpha": 20e-6, "beta": 1 / 3e9, "gamma": 1 / 12e9}
    path = tmp_path / "allreduce_synthetic.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["impl", "ranks", "bytes", "median_us"])
        for ranks in (2, 3, 4, 8):
            for algorithm in scaling.FITTED_ALGORITHMS:
                for nbytes in (4, 4096, 1 << 16, 1 << 20, 1 << 24):
                    seconds = scaling.predict_allreduce(algorithm, nbytes, ranks, truth)
                    writer.writerow([algorithm, ranks, nbytes, seconds * 1e6])
    fit = scaling.fit_allreduce(path)
    for name, value in truth.items():
        assert getattr(fit, name) == pytest.approx(value, rel=1e-3), (name, fit)
    assert max(fit.relative_errors()) < 1e-3


def test_model_command_projects_to_65536_ranks():
    run = granger("model", "--bench", ROOT / "docs" / "bench", "--network", "local,ib100,10gbe",
                  timeout=120)
    assert run.returncode == 0, run.output
    for expected in ("allreduce_p2.csv", "100 Gb/s InfiniBand-class", "10 Gb/s Ethernet",
                     "median err", "GFLOP/s"):
        assert expected in run.stdout, run.output
    rows = [line.split() for line in run.stdout.splitlines() if line.strip().startswith("65536")]
    assert len(rows) == 3, run.output      # one projection per network


@pytest.mark.parametrize("args, expected", [
    (["--sizes", "784"], "--sizes"),
    (["--network", "carrier-pigeon"], "carrier-pigeon"),
    (["--bench", "/nonexistent"], "no allreduce_*.csv"),
])
def test_model_command_refuses_bad_arguments(args, expected):
    run = granger("model", *args, timeout=60)
    assert run.returncode == 2, run.output
    assert expected in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.output


def test_model_matches_what_auto_uses():
    """The fitted formulas are collectives.auto's, so the projection picks what auto would."""
    from granger_mpi.collectives import auto
    model = {"alpha": 7e-6, "beta": 1 / 5e9, "gamma": 1 / 20e9}
    for algorithm in scaling.FITTED_ALGORITHMS:
        for ranks in (2, 3, 4, 6, 8, 1024, 65536):
            for nbytes in (4, 1 << 20):
                assert scaling.predict_allreduce(algorithm, nbytes, ranks, model) == pytest.approx(
                    auto.model_seconds(algorithm, nbytes, ranks, model), rel=1e-12), (algorithm, ranks)
