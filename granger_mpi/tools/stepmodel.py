"""The model of one training step, buckets and overlap included (docs/scaling.md).

On ``P`` ranks with ``r = ceil(batch / P)`` rows each, a step is

    stretch * fixed  +  kernel(r)  +  the exchange left when backward ends

- ``kernel``: the kernel benchmark's loss-and-gradient seconds at ``r`` rows and the rank's
  threads (``scripts/bench-kernels``, log-log interpolation between batches), measured with
  as many processes computing as ranks share the CPUs where the benchmark has that case, or
  alone and stretched; split between forward and each layer's backward by their FLOPs.
- ``fixed``: what a step costs besides the kernel and the exchange (the optimizer's update
  of every parameter, the loader, metrics, Python, the wait for the slowest rank), the same
  at every P; the model's one free term, fitted to measured runs (``fit_fixed``).
- ``stretch``: ranks whose threads outnumber the CPUs they share take turns on them.
- The exchange: the buckets ``collectives.overlap.plan`` cuts (one message on one node,
  ``bucket_mb`` across nodes), each with the algorithm ``auto.decide`` picks, each taking
  the benchmark's median time at its size (``allreduce_*.csv`` of that setting, log-log
  interpolation; the alpha-beta-gamma fit outside the measured sizes). Overlapped (a core is
  free for the exchange thread), bucket ``k`` starts when backward has finished it and the
  bucket before has been summed; otherwise all start after backward.

A measured step far from the prediction points at a term, which is what the model is for.
"""

import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from granger_mpi.collectives import auto, costmodel, overlap
from granger_mpi.errors import UserError
from granger_mpi.model.models import Model
from granger_mpi.mpi.threads import default_threads
from granger_mpi.tools import scaling

N_STATS = 5     # the step's statistics travel in the first bucket (training.step)


@dataclass(frozen=True)
class Setting:
    """Where a job runs: ``ranks`` over ``hosts`` (1: one node) that share the CPUs of
    ``kernels`` machines of ``cores`` CPUs each (emulated hosts all share one kernel)."""

    ranks: int
    hosts: int
    cores: int
    kernels: int | None = None     # None: one per host
    threads: int | None = None     # per rank; None: granger-mpi's default share

    @property
    def ranks_sharing_cpus(self):
        return math.ceil(self.ranks / (self.kernels or self.hosts))

    @property
    def threads_per_rank(self):
        return self.threads or default_threads(self.cores, self.ranks_sharing_cpus)

    @property
    def stretch(self):
        """How much slower compute runs because ranks share CPUs (1 with a core each)."""
        return max(1.0, self.ranks_sharing_cpus * self.threads_per_rank / self.cores)

    @property
    def core_free(self):
        """Whether ``overlap = "auto"`` starts the exchange thread (``threads``)."""
        return self.cores >= (self.threads_per_rank + 1) * self.ranks_sharing_cpus

    def label(self):
        where = "one node" if self.hosts == 1 else f"{self.hosts} emulated hosts"
        return f"P={self.ranks}, {where}, {self.threads_per_rank} thread(s) per rank"


def _loglog(points, x):
    """``y(x)`` by linear interpolation of ``log y`` in ``log x`` over ``points`` (x, y),
    extended along the nearest segment outside them."""
    points = sorted(points)
    if len(points) == 1:
        return points[0][1] * x / points[0][0]
    i = next((k for k in range(1, len(points)) if points[k][0] >= x), len(points) - 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    slope = math.log(y1 / y0) / math.log(x1 / x0)
    return y0 * (x / x0) ** slope


def read_kernel_times(path, sizes):
    """``{(threads, processes): [(batch, median seconds)]}`` of the numba rows of ``path`` for
    ``sizes``; ``processes``: how many computed at once (1 where the CSV does not say)."""
    found = {}
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row["implementation"] == "numba" and tuple(map(int, row["sizes"].split(","))) == tuple(sizes):
                    key = (int(row["threads"]), int(row.get("processes") or 1), int(row["batch"]))
                    found.setdefault(key, []).append(float(row["seconds"]))
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"{path}: not a readable kernel benchmark CSV ({exc})") from None
    times = {}
    for (threads, processes, batch), seconds in sorted(found.items()):
        times.setdefault((threads, processes), []).append((batch, statistics.median(seconds)))
    if not times:
        raise UserError(f"{path}: no numba rows for sizes {','.join(map(str, sizes))} (run "
                        f"scripts/bench-kernels --sizes {','.join(map(str, sizes))} --batch 64,128,256)")
    return times


@dataclass
class Prediction:
    """One step by the model, in seconds."""

    setting: Setting
    compute: float          # kernel + stretched fixed
    exchange_left: float    # the exchange after backward ended
    buckets: list           # (bytes, algorithm, seconds)
    overlapped: bool

    @property
    def step(self):
        return self.compute + self.exchange_left

    @property
    def overlap_fraction(self):
        """The share of the exchange that ran while backward did."""
        total = sum(s for _, _, s in self.buckets)
        return max(0.0, 1 - self.exchange_left / total) if self.overlapped and total else 0.0


class StepModel:
    """Step times of an MLP of ``sizes`` at global ``batch`` (see the module's text)."""

    def __init__(self, sizes, batch, kernel_times, fixed_s=0.0, calibration=None, bucket_mb="auto"):
        self.sizes, self.batch = tuple(sizes), batch
        self.kernel_times = kernel_times
        self.fixed_s = fixed_s
        self.calibration = calibration if calibration is not None else auto.merged_document()
        self.bucket_mb = bucket_mb
        model = Model("mlp", self.sizes, "relu", "classification")
        self.n_params, self.boundaries = model.layout.size, model.backward_boundaries

    def kernel_seconds(self, rows, setting):
        """The benchmark's loss-and-gradient seconds at ``rows`` rows for a rank of
        ``setting``: measured with as many processes computing as share its CPUs, or alone
        and stretched by the sharing."""
        threads, sharing = setting.threads_per_rank, setting.ranks_sharing_cpus
        if (threads, sharing) in self.kernel_times:
            return _loglog(self.kernel_times[threads, sharing], rows)
        if (threads, 1) in self.kernel_times:
            return _loglog(self.kernel_times[threads, 1], rows) * setting.stretch
        raise UserError(f"the kernel benchmark has no {threads}-thread rows (measured: threads, "
                        f"processes {', '.join(map(str, sorted(self.kernel_times)))})")

    def buckets(self, setting):
        """``(lo, hi)`` element ranges of the exchange buffer, as the trainer cuts them."""
        mb = self.bucket_mb
        if mb == "auto":
            mb = 0 if setting.hosts == 1 else overlap.AUTO_BUCKET_MB
        n = self.n_params + N_STATS
        if mb <= 0:
            return [(0, n)]
        return overlap.plan(self.boundaries, n, max(1, int(mb * 2**20) // 4))

    def predict(self, setting, allreduce_rows=None):
        """The ``Prediction`` for ``setting``; ``allreduce_rows`` (``scaling.read_allreduce_csv``)
        of the allreduce benchmark at that setting, needed when ``setting.ranks > 1``."""
        rows = math.ceil(self.batch / setting.ranks)
        kernel = self.kernel_seconds(rows, setting)
        forward_flops, backward_flops = scaling.layer_flops(self.sizes)
        per_flop = kernel / (forward_flops + sum(backward_flops))
        compute = kernel + self.fixed_s * setting.stretch
        if setting.ranks == 1:
            return Prediction(setting, compute, 0.0, [], False)
        # When backward has finished each layer (last first), from the step's start.
        done, t = {}, forward_flops * per_flop
        for offset, flops in zip(self.boundaries, backward_flops):
            t += flops * per_flop
            done[offset] = t
        backward_end = t
        overlapped = setting.core_free
        end, buckets = backward_end if not overlapped else 0.0, []
        for lo, hi in self.buckets(setting):
            nbytes = 4 * (hi - lo)
            algorithm, _, _ = auto.decide(self.calibration, nbytes, setting.ranks, setting.hosts == 1)
            seconds = self.allreduce_seconds(allreduce_rows, algorithm, nbytes, setting.ranks)
            ready = min(when for offset, when in done.items() if offset <= lo) if overlapped else end
            end = max(end, ready) + seconds
            buckets.append((nbytes, algorithm, seconds))
        return Prediction(setting, compute, max(0.0, end - backward_end), buckets, overlapped)

    @staticmethod
    def allreduce_seconds(rows, algorithm, nbytes, ranks):
        """The measured median of ``algorithm`` at ``nbytes`` in ``rows`` (interpolated), or
        the alpha-beta-gamma fit of the same table outside its sizes."""
        points = [(n, t) for impl, p, n, t in rows or () if impl == algorithm and p == ranks]
        if not points:
            raise UserError(f"no allreduce benchmark of {algorithm} at P = {ranks} for this setting")
        if min(points)[0] <= nbytes <= max(points)[0]:
            return _loglog(points, nbytes)
        fitted = scaling.fit_rows([r for r in rows if r[0] in scaling.FITTED_ALGORITHMS and r[1] == ranks])
        return costmodel.seconds(algorithm, nbytes, ranks, fitted)


def allreduce_csv(bench_dir, setting, link):
    """The allreduce benchmark of ``setting``: ``allreduce_p{P}.csv`` on one node,
    ``allreduce_p{P}_{H}hosts_{link}.csv`` across emulated hosts."""
    name = (f"allreduce_p{setting.ranks}.csv" if setting.hosts == 1
            else f"allreduce_p{setting.ranks}_{setting.hosts}hosts_{link}.csv")
    return Path(bench_dir) / name


def read_measured_steps(path):
    """``{(ranks, hosts, link, threads): [seconds per step]}`` of granger-mpi's runs in a
    ``scripts/bench-ddp`` CSV (its ``hosts``, ``link`` and ``steps`` columns)."""
    found = {}
    try:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row["impl"] == "granger-mpi":
                    key = (int(row["ranks"]), int(row["hosts"]), row["link"], int(row["threads_per_rank"]))
                    found.setdefault(key, []).append(float(row["seconds"]) / int(row["steps"]))
    except (OSError, KeyError, ValueError) as exc:
        raise UserError(f"{path}: not a scripts/bench-ddp CSV with hosts, link and steps columns ({exc})") from None
    return found


def fit_fixed(pairs):
    """The fixed cost per step that minimises the squared relative errors of ``pairs``
    ``(Prediction made with no fixed cost, measured seconds)``; at least 0."""
    num = sum(p.setting.stretch / m * (1 - p.step / m) for p, m in pairs)
    den = sum((p.setting.stretch / m) ** 2 for p, m in pairs)
    return max(0.0, num / den)


def report(bench_dir, measured_csvs, sizes, batch, kernels_csv, cores):
    """The text of ``granger-mpi model --steps``: each measured setting (the median over its
    runs of training seconds over steps) against the model, whose one free term (``fixed``) is
    fitted to the one-node runs; the runs across hosts are predictions."""
    measured = {}
    for path in measured_csvs:
        measured.update(read_measured_steps(path))
    if not measured:
        raise UserError(f"no granger-mpi runs in {', '.join(map(str, measured_csvs))}")
    model = StepModel(sizes, batch, read_kernel_times(kernels_csv, sizes))

    def setting_of(key):
        ranks, hosts, _, threads = key
        return Setting(ranks, hosts, cores, kernels=1, threads=threads)   # emulated hosts share this kernel

    def predict(key):
        setting = setting_of(key)
        rows = (scaling.read_allreduce_csv(allreduce_csv(bench_dir, setting, key[2]))
                if setting.ranks > 1 else None)
        return model.predict(setting, rows)

    one_node = [k for k in measured if k[1] == 1]
    if one_node:
        model.fixed_s = fit_fixed([(predict(k), statistics.median(measured[k])) for k in one_node])
        fitted = f"fitted to the one-node runs (P = {', '.join(str(k[0]) for k in sorted(one_node))})"
    else:
        fitted = "0: no one-node run to fit it to"
    lines = [f"step model of MLP {','.join(map(str, sizes))}, global batch {batch}, kernels from "
             f"{Path(kernels_csv).name}; fixed cost per step {1e3 * model.fixed_s:.2f} ms, {fitted}",
             f"{'setting':<52} {'measured ms':>11} {'(runs)':>15} {'model ms':>9} {'compute':>8} "
             f"{'exch. left':>10}  {'buckets':<28} {'overlap':>7} {'error':>6}"]
    for key in sorted(measured, key=lambda k: (k[1], k[0])):
        steps = sorted(measured[key])
        p = predict(key)
        median = statistics.median(steps)
        algorithms = sorted({a for _, a, _ in p.buckets})
        buckets = f"{len(p.buckets)} x {','.join(algorithms)}" if p.buckets else "-"
        link = f", {key[2]}" if key[2] else ""
        lines.append(f"{setting_of(key).label() + link:<52} {1e3 * median:11.2f} "
                     f"{f'({1e3 * steps[0]:.2f}-{1e3 * steps[-1]:.2f})':>15} {1e3 * p.step:9.2f} {1e3 * p.compute:8.2f} "
                     f"{1e3 * p.exchange_left:10.2f}  {buckets:<28} {100 * p.overlap_fraction:6.0f}% "
                     f"{100 * (p.step - median) / median:+5.0f}%")
    return "\n".join(lines)
