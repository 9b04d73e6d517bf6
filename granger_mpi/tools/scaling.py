"""``granger-mpi model``: an alpha-beta-gamma cost model fitted to the benchmark CSVs, and
step-time / efficiency predictions from one machine to 65,536 ranks.

The model (``collectives.costmodel``, docs/architecture.md): an allreduce of ``n`` bytes
on ``P`` ranks costs ``x_alpha * alpha + x_beta * n * beta + x_gamma * n * gamma`` where the
multipliers depend on the algorithm (ring ``2(P-1), 2(P-1)/P, (P-1)/P``; recursive
halving-doubling ``2 log2 P, 2(P-1)/P, (P-1)/P``; recursive doubling ``log2 P`` times
``1, 1, 1``; a non-power of two folds its extra ranks in first). That is linear in
(alpha, beta, gamma), so each ``docs/bench/allreduce_*.csv`` (one machine or emulated
network) is fitted by non-negative least squares on *relative* error over the message-
passing algorithms (ring, rhd, rd), the ones that cross a network.

A training step is then ``compute(global_batch / P) + allreduce(4 * parameters)`` with the
algorithm ``auto`` would take by the model (the fastest predicted; ``shm`` and
``hierarchical`` are one-node algorithms and are not projected across nodes). Compute per
sample comes from ``docs/bench/kernels.csv`` (the kernel's measured FLOP rate, scaled by
the model's FLOPs per sample). The measured steps of a job on this machine and on emulated
hosts, buckets and overlap included, are ``tools.stepmodel``'s (``granger-mpi model --steps``).
"""

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from granger_mpi.collectives import costmodel
from granger_mpi.errors import UserError

FITTED_ALGORITHMS = ("ring", "rhd", "rd")
# Network presets: per-message latency and per-byte cost of the link. The Python cost of
# one hand-written exchange (about 6-10 us measured here, docs/performance.md) is added to
# alpha; gamma (adding bytes) is the node's, taken from the local fit.
PYTHON_PER_MESSAGE_S = 8e-6
NETWORKS = {
    "ib100": {"label": "100 Gb/s InfiniBand-class", "latency_s": 1.5e-6, "bytes_per_s": 12.5e9},
    "10gbe": {"label": "10 Gb/s Ethernet", "latency_s": 25e-6, "bytes_per_s": 1.25e9},
}
PROJECTION_RANKS = (2, 4, 8, 16, 32, 64, 256, 1024, 4096, 16384, 65536)


def predict_allreduce(algorithm, nbytes, size, model):
    """Seconds of one allreduce by the model ``{alpha, beta, gamma}``."""
    return costmodel.seconds(algorithm, nbytes, size, model)


def best_algorithm(nbytes, size, model):
    """(name, seconds) of the fastest message-passing algorithm by the model: auto's choice."""
    times = {a: predict_allreduce(a, nbytes, size, model) for a in FITTED_ALGORITHMS}
    name = min(times, key=times.get)
    return name, times[name]


def read_allreduce_csv(path):
    """Rows ``(impl, ranks, bytes, median_seconds)`` of a ``bench allreduce`` CSV."""
    try:
        with open(path, newline="") as f:
            return [(r["impl"], int(r["ranks"]), int(r["bytes"]), float(r["median_us"]) * 1e-6)
                    for r in csv.DictReader(f)]
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"{path}: not a readable allreduce benchmark CSV ({exc})") from None


@dataclass
class Fit:
    """alpha, beta, gamma fitted to one CSV, and the errors on its points."""

    source: str
    alpha: float
    beta: float
    gamma: float
    points: list      # (impl, ranks, bytes, measured s, predicted s)

    @property
    def model(self):
        return {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma}

    def relative_errors(self, min_bytes=0):
        return [abs(p - m) / m for _, _, n, m, p in self.points if n >= min_bytes]


def fit_rows(rows):
    """``{alpha, beta, gamma}`` by non-negative least squares on relative error over ``rows``
    ``(impl, ranks, bytes, seconds)`` (ring/rhd/rd ones; at least 3)."""
    from scipy.optimize import nnls
    A = np.array([costmodel.coefficients(impl, n, p) / t for impl, p, n, t in rows])
    # Columns differ by 10^9 in scale (alpha vs per-byte costs): normalise for the solver.
    scale = np.abs(A).max(axis=0)
    scale[scale == 0] = 1
    x, _ = nnls(A / scale, np.ones(len(rows)))
    alpha, beta, gamma = x / scale
    return {"alpha": alpha, "beta": beta, "gamma": gamma}


def fit_allreduce(path, min_bytes=0):
    """``fit_rows`` over the ring/rhd/rd points of ``path``, with its errors."""
    rows = [r for r in read_allreduce_csv(path) if r[0] in FITTED_ALGORITHMS and r[2] >= min_bytes]
    if len(rows) < 3:
        raise UserError(f"{path}: fewer than 3 ring/rhd/rd points to fit")
    model = fit_rows(rows)
    points = [(impl, p, n, t, predict_allreduce(impl, n, p, model)) for impl, p, n, t in rows]
    return Fit(Path(path).name, model["alpha"], model["beta"], model["gamma"], points)


def layer_flops(sizes):
    """``(forward, [backward of each layer, last layer first])`` FLOPs per row: forward,
    weight gradients, and input gradients of every layer but the first (the kernels skip
    that one)."""
    forward = [2 * d_in * d_out for d_in, d_out in zip(sizes[:-1], sizes[1:])]
    backward = [f * (2 if layer > 0 else 1) for layer, f in enumerate(forward)]
    return sum(forward), backward[::-1]


def mlp_flops_per_sample(sizes):
    """FLOPs of loss+gradient per row (``layer_flops`` summed)."""
    forward, backward = layer_flops(sizes)
    return forward + sum(backward)


def mlp_parameters(sizes):
    return sum(d_in * d_out + d_out for d_in, d_out in zip(sizes[:-1], sizes[1:]))


def compute_rate(kernels_csv):
    """FLOP/s of the numba MLP kernel on one thread: the median over the batches of
    ``kernels.csv`` of each batch's median rate."""
    try:
        with open(kernels_csv, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r["implementation"] == "numba" and r["threads"] == "1"]
        by_shape = {}
        for r in rows:
            by_shape.setdefault((r["sizes"], int(r["batch"])), []).append(float(r["seconds"]))
        rates = [mlp_flops_per_sample([int(s) for s in sizes.split(",")]) * batch / statistics.median(times)
                 for (sizes, batch), times in by_shape.items()]
        return statistics.median(rates)
    except (OSError, KeyError, ValueError, statistics.StatisticsError) as exc:
        raise UserError(f"{kernels_csv}: not a readable one-thread kernel benchmark CSV ({exc})") from None


def network_model(name, local_fit):
    """alpha/beta/gamma of a network preset (gamma, the adds, from the local machine's fit)."""
    net = NETWORKS[name]
    return {"alpha": net["latency_s"] + PYTHON_PER_MESSAGE_S, "beta": 1.0 / net["bytes_per_s"],
            "gamma": local_fit.gamma}


def predict_step(sizes, global_batch, size, flops_per_s, model, read_s_per_row=0.0):
    """(step seconds, compute s, allreduce s, algorithm) of one training step at ``size`` ranks.

    ``read_s_per_row``: the data loader's cost per row a rank reads, counted in the step
    (granger-mpi reads each step's rows from HDF5 in a thread that, on a busy node, shares
    the cores with compute); it goes into the compute seconds.
    """
    rows = math.ceil(global_batch / size)
    compute = mlp_flops_per_sample(sizes) * rows / flops_per_s + rows * read_s_per_row
    nbytes = 4 * mlp_parameters(sizes)
    if size == 1:
        return compute, compute, 0.0, "-"
    algorithm, comm = best_algorithm(nbytes, size, model)
    return compute + comm, compute, comm, algorithm


def projection(sizes, global_batch, per_rank_batch, flops_per_s, model, ranks=PROJECTION_RANKS,
               read_s_per_row=0.0):
    """Rows for each P: the algorithm, allreduce seconds, and both scaling rules.

    Strong scaling: a fixed global batch (granger-mpi's rule), only while P <= the batch.
    Weak scaling: ``per_rank_batch`` rows per rank (the global batch grows with P), as large
    jobs run. Efficiency is samples/s over P times the one-rank samples/s of the same rule.
    """
    strong_one = predict_step(sizes, global_batch, 1, flops_per_s, model, read_s_per_row)[0]
    weak_one = predict_step(sizes, per_rank_batch, 1, flops_per_s, model, read_s_per_row)[0]
    rows = []
    for p in ranks:
        weak_step, _, comm, algorithm = predict_step(sizes, per_rank_batch * p, p, flops_per_s, model,
                                                     read_s_per_row)
        row = {"ranks": p, "algorithm": algorithm, "comm_s": comm, "weak_step_s": weak_step,
               "weak_samples_per_s": per_rank_batch * p / weak_step,
               "weak_efficiency": weak_one / weak_step, "strong_step_s": None,
               "strong_efficiency": None}
        if p <= global_batch:
            step = predict_step(sizes, global_batch, p, flops_per_s, model, read_s_per_row)[0]
            row.update(strong_step_s=step, strong_efficiency=strong_one / (p * step))
        rows.append(row)
    return rows


def _rate(seconds_per_byte):
    """``x.xx GB/s``; a zero fitted cost means the data could not resolve it."""
    return f"{1 / seconds_per_byte / 1e9:.2f} GB/s" if seconds_per_byte > 0 else "unresolved"


def report(bench_dir, sizes, global_batch, ranks, networks, per_rank_batch, read_s_per_row=0.0,
           min_bytes=0):
    """The text ``granger-mpi model`` prints."""
    bench_dir = Path(bench_dir)
    csvs = sorted(bench_dir.glob("allreduce_*.csv"))
    if not csvs:
        raise UserError(f"{bench_dir}: no allreduce_*.csv (run `granger-mpi bench allreduce` first)")
    kernels_csv = bench_dir / "kernels.csv"
    if not kernels_csv.is_file():
        raise UserError(f"{kernels_csv} not found (run scripts/bench-kernels first)")
    lines = ["alpha-beta-gamma fits (ring, rhd, rd medians; relative-error least squares)",
             f"{'source':<34} {'alpha us':>9} {'1/beta':>10} {'1/gamma':>11} {'points':>6} "
             f"{'median err':>10} {'max err':>8}"]
    fits = {}
    for path in csvs:
        fit = fit_allreduce(path, min_bytes)
        fits[path.stem] = fit
        errors = fit.relative_errors()
        lines.append(f"{fit.source:<34} {fit.alpha * 1e6:9.2f} {_rate(fit.beta):>10} {_rate(fit.gamma):>11} "
                     f"{len(errors):6d} {100 * statistics.median(errors):9.1f}% {100 * max(errors):7.0f}%")
    local = fits.get("allreduce_p2") or next(iter(fits.values()))
    flops = compute_rate(kernels_csv)
    n_params = mlp_parameters(sizes)
    lines += ["", f"data reads: {read_s_per_row * 1e6:.1f} us per row a rank reads (--read-us-per-row)",
              f"compute: numba MLP kernel {flops / 1e9:.1f} GFLOP/s (kernels.csv); model "
                  f"{','.join(map(str, sizes))}: {n_params:,} parameters ({4 * n_params / 2**20:.2f} MiB "
                  f"gradient), {mlp_flops_per_sample(sizes) / 1e6:.3f} MFLOP per sample"]
    for name in networks:
        if name == "local":
            model, label = local.model, f"this machine ({local.source})"
        else:
            model, label = network_model(name, local), NETWORKS[name]["label"]
        lines += ["", f"{label}: alpha {model['alpha'] * 1e6:.1f} us, beta {1 / model['beta'] / 1e9:.2f} GB/s, "
                      f"gamma {_rate(model['gamma'])}; model {','.join(map(str, sizes))}",
                  f"{'':>24}|  strong: global batch {global_batch:<6}|  weak: {per_rank_batch} rows per rank",
                  f"{'P':>7} {'algorithm':>9} {'comm ms':>9}  | {'step ms':>9} {'effic.':>8}   | "
                  f"{'step ms':>9} {'samples/s':>14} {'effic.':>7}"]
        for row in projection(sizes, global_batch, per_rank_batch, flops, model, ranks, read_s_per_row):
            strong = (f"{1e3 * row['strong_step_s']:9.3f} {100 * row['strong_efficiency']:7.1f}%"
                      if row["strong_step_s"] is not None else f"{'P > batch':>9} {'-':>8}")
            lines.append(f"{row['ranks']:>7} {row['algorithm']:>9} {1e3 * row['comm_s']:9.3f}  | {strong}   | "
                         f"{1e3 * row['weak_step_s']:9.3f} {row['weak_samples_per_s']:14,.0f} "
                         f"{100 * row['weak_efficiency']:6.1f}%")
    return "\n".join(lines)
