"""The benchmark suite: worker scaling, data scaling and allreduce strategies on real
training runs, then the fault and checkpoint benchmarks; CSV and PNG under docs/bench/, and
the tables regenerated into docs/performance.md between the ``bench suite`` markers.

Every run is ``mpirun -n P granger-mpi train`` of a synthetic classification problem.
Throughput is the global samples of every step after the first ``WARMUP_STEPS`` over the
sum of their step times on rank 0 (start-up, JIT, evaluation and the final checkpoint are
left out; they are in the wall time, reported beside). Median of ``--reps`` runs, spread
as min-max. This machine's core count is printed: P beyond it is oversubscribed, so past
it the efficiency falls by design, and ranks yield when idle
(``OMPI_MCA_mpi_yield_when_idle=1``; polling ranks would take turns on the cores).
"""

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

import bench_common
from bench_common import ROOT

OUT = ROOT / "docs" / "bench"
PERFORMANCE = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- bench suite: begin -->", "<!-- bench suite: end -->"
ENV = bench_common.YIELDING
WARMUP_STEPS = 3
MIN_STEPS = 40     # data scaling: at least this many steps, so small sets are timed too
PROBLEM = ("65,536 rows x 64 features, 10 classes (4 overlapping blobs each), MLP 64-256-10, "
           "global batch 512, SGD with momentum")
SECTIONS = ("workers", "data", "strategies", "faults", "checkpoint")

def make_dataset(path, rows):
    return bench_common.make_dataset(path, rows=rows, features=64, classes=10, seed=7, clusters=4,
                                     separation=0.35, test_rows=5000, env=ENV)


def train(tmp, data, ranks, *, algorithm="auto", strategy="sync", batch=512, epochs=3,
          name="run"):
    """One run: (samples/s after warm-up, wall s, test accuracy %)."""
    run_dir = tmp / name
    collectives = {"algorithm": algorithm, **({"ranks_per_node": 2} if algorithm == "hierarchical" else {})}
    job = bench_common.write_job(tmp / f"{name}.toml", {
        "data": {"path": str(data), "test_path": str(data.with_name(data.stem + "-test.h5"))},
        "model": {"kind": "mlp", "hidden": [256]},
        "optimizer": {"learning_rate": 0.05, "momentum": 0.9},
        "train": {"global_batch": batch, "epochs": epochs, "seed": 1, "strategy": strategy},
        "collectives": collectives, "fault": {"mode": "restart"},
        "output": {"run_dir": str(run_dir), "progress_interval_s": 100000.0},
        "checkpoint": {"at_end": False}})
    run = bench_common.train(job, ranks, run_dir=run_dir, args=["--overwrite"], env=ENV)
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        seconds = f["step_time_s"][WARMUP_STEPS:]
        samples = f["samples_per_s"][WARMUP_STEPS:] * seconds
    accuracy = run.summary["test_accuracy"]
    return (float(samples.sum() / seconds.sum()), run.wall_s,
            100 * accuracy if accuracy is not None else float("nan"))


def repeat(reps, fn, **labels):
    """``reps`` runs of ``fn`` as one row: medians, and min-max of the throughput."""
    runs = [fn() for _ in range(reps)]
    rates = [r[0] for r in runs]
    row = {**labels, "samples_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
           "wall_s": statistics.median(r[1] for r in runs),
           "test_accuracy": statistics.median(r[2] for r in runs), "reps": reps}
    print(f"  {labels}: {row['samples_per_s']:,.0f} samples/s (min {row['min']:,.0f}, max "
          f"{row['max']:,.0f}), wall {row['wall_s']:.1f} s, test acc {row['test_accuracy']:.1f}%",
          flush=True)
    return row


def text_table(rows, first, middle=()):
    """Aligned lines: the ``first`` and ``middle`` columns, then throughput, wall time and
    accuracy; a column is ``(header, width, format of a row)``."""
    columns = [first, ("samples/s", 11, lambda r: f"{r['samples_per_s']:,.0f}"),
               ("min", 9, lambda r: f"{r['min']:,.0f}"), ("max", 9, lambda r: f"{r['max']:,.0f}"),
               *middle, ("wall s", 7, lambda r: f"{r['wall_s']:.1f}"),
               ("test acc", 8, lambda r: f"{r['test_accuracy']:.1f}%")]
    return [" ".join(f"{header:>{width}}" for header, width, _ in columns)] + \
        [" ".join(f"{fmt(r):>{width}}" for _, width, fmt in columns) for r in rows]


def figure(panels):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6 * panels, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def error_bars(rows):
    rate = np.array([r["samples_per_s"] for r in rows])
    return rate, np.array([rate - [r["min"] for r in rows], [r["max"] for r in rows] - rate])


def workers(tmp, args, cores):
    data = make_dataset(tmp / "workers.h5", 65536)
    rows = [repeat(args.reps if p <= 8 else max(1, args.reps - 1),
                   lambda p=p: train(tmp, data, p, name=f"w{p}"), ranks=p)
            for p in args.ranks]
    base = rows[0]["samples_per_s"] / rows[0]["ranks"]
    for r in rows:
        r["efficiency"] = r["samples_per_s"] / (base * r["ranks"])
    bench_common.write_csv(rows, OUT / "suite_workers.csv")
    fig, (ax, eff) = figure(2)
    rate, spread = error_bars(rows)
    ranks = [r["ranks"] for r in rows]
    ax.errorbar(ranks, rate, yerr=spread, marker="o", capsize=3)
    ax.axvline(cores, color="grey", linestyle="--", label=f"{cores} cores")
    ax.set(xscale="log", xlabel="ranks P", ylabel="samples/s", title="worker scaling (fixed problem)")
    ax.set_xticks(ranks, [str(p) for p in ranks])
    ax.legend()
    eff.plot(ranks, [r["efficiency"] for r in rows], marker="o")
    eff.axvline(cores, color="grey", linestyle="--")
    eff.set(xscale="log", xlabel="ranks P", ylabel="efficiency vs P = 1", ylim=(0, 1.2))
    eff.set_xticks(ranks, [str(p) for p in ranks])
    fig.savefig(OUT / "suite_workers.png")
    table = text_table(rows, ("P", 3, lambda r: str(r["ranks"])),
                       [("efficiency", 10, lambda r: f"{r['efficiency']:.2f}")])
    return (f"Worker scaling: {PROBLEM}, 3 epochs (384 steps), allreduce auto, "
            f"P = {', '.join(map(str, args.ranks))} on {cores} cores (P > {cores} oversubscribed). "
            f"Efficiency = throughput / (P x throughput at P = 1).", table)


def data_scaling(tmp, args, cores):
    rows = []
    for n in args.rows:
        data = make_dataset(tmp / f"rows{n}.h5", n)
        epochs = max(1, -(-MIN_STEPS * 512 // n))    # small sets: enough steps to time
        rows.append(repeat(args.reps, lambda data=data, n=n, epochs=epochs:
                           train(tmp, data, 2, epochs=epochs, name=f"d{n}"), rows=n, epochs=epochs))
    bench_common.write_csv(rows, OUT / "suite_data.csv")
    fig, (ax, wall) = figure(2)
    rate, spread = error_bars(rows)
    sizes = [r["rows"] for r in rows]
    ax.errorbar(sizes, rate, yerr=spread, marker="o", capsize=3)
    ax.set(xscale="log", xlabel="rows", ylabel="samples/s", title="data scaling (P = 2)")
    wall.plot(sizes, [r["wall_s"] for r in rows], marker="o")
    wall.set(xscale="log", yscale="log", xlabel="rows", ylabel="wall seconds (with start-up)")
    fig.savefig(OUT / "suite_data.png")
    table = text_table(rows, ("rows", 9, lambda r: f"{r['rows']:,}"),
                       [("epochs", 6, lambda r: str(r["epochs"]))])
    return (f"Data scaling: P = 2, the same problem at other sizes, 1 epoch (small sets: "
            f"enough epochs for {MIN_STEPS} steps); throughput excludes start-up, wall time "
            f"includes it.", table)


def strategies(tmp, args, cores):
    data = make_dataset(tmp / "workers.h5", 65536)
    rows = []
    for name in ("native", "ring", "rhd", "hierarchical", "auto", "async"):
        run = (lambda: train(tmp, data, 4, strategy="async", name="s-async")) if name == "async" else \
              (lambda name=name: train(tmp, data, 4, algorithm=name, name=f"s-{name}"))
        rows.append(repeat(args.reps, run, strategy=name))
    bench_common.write_csv(rows, OUT / "suite_strategies.csv")
    fig, (ax,) = figure(1)
    rate, spread = error_bars(rows)
    ax.bar([r["strategy"] for r in rows], rate, yerr=spread, capsize=3)
    ax.set(ylabel="samples/s", title="strategies at P = 4 (async: 1 server + 3 workers)")
    fig.savefig(OUT / "suite_strategies.png")
    table = text_table(rows, ("strategy", 12, lambda r: r["strategy"]))
    return ("Strategies at P = 4 on the worker-scaling problem: the allreduce algorithms "
            "(hierarchical with emulated nodes of 2 ranks) and the asynchronous parameter "
            "server (rank 0 serves, 3 workers; its samples/s is the server's update rate times "
            "the batch).", table)


def script(name):
    def run(tmp, args, cores):
        done = subprocess.run([str(ROOT / "scripts" / name)], capture_output=True, text=True,
                              env=ENV, timeout=3600)
        if done.returncode != 0:
            sys.exit(f"scripts/{name}: exit {done.returncode}\n{(done.stdout + done.stderr)[-3000:]}")
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        return (f"`scripts/{name}` (its own section earlier in this file explains the method).", lines)
    return run


def checkpoint(tmp, args, cores):
    """``scripts/bench-checkpoint``, and a chart of its CSVs: save and dd GB/s by size."""
    caption, lines = script("bench-checkpoint")(tmp, args, cores)
    fig, (ax,) = figure(1)
    for ranks in (1, 2, 4):
        with open(OUT / f"checkpoint_p{ranks}.csv") as fh:
            rows = list(csv.DictReader(fh))
        sizes = sorted({float(r["mib"]) for r in rows})
        def gbps(key):
            return [size * 2**20 / 1e9 / statistics.median(float(r[key]) for r in rows
                                                            if float(r["mib"]) == size) for size in sizes]
        ax.plot(sizes, gbps("save_s"), marker="o", label=f"save, P = {ranks}")
        if ranks == 1:
            ax.plot(sizes, gbps("dd_s"), marker="s", color="black", linestyle="--",
                    label="dd conv=fsync (P = 1 run)")
    ax.set(xscale="log", xlabel="state, MiB", ylabel="GB/s",
           title="checkpoint save (with verification) vs dd")
    ax.legend()
    fig.savefig(OUT / "suite_checkpoint.png")
    return caption, lines


RUNNERS = {"workers": workers, "data": data_scaling, "strategies": strategies,
           "faults": script("bench-fault"), "checkpoint": checkpoint}


def update_performance(blocks, command):
    """Replace each rerun section of the suite's part of docs/performance.md (between the
    markers; sections not rerun are kept, the part is appended if absent)."""
    text = PERFORMANCE.read_text()
    if BEGIN not in text or END not in text:
        text = (text.rstrip("\n") + f"\n\n{BEGIN}\n## Benchmark suite\n\nCommand: `scripts/bench` "
                f"(all sections; `--only` reruns some). CSV and PNG: `docs/bench/suite_*`. Ranks "
                f"yield when idle (`OMPI_MCA_mpi_yield_when_idle=1`); throughput leaves out the "
                f"first {WARMUP_STEPS} steps and start-up; median of `--reps` runs, min and max "
                f"beside.\n\n{END}\n")
    for section, (caption, lines) in blocks.items():
        start, stop = f"<!-- suite: {section} -->", f"<!-- /suite: {section} -->"
        body = "\n".join([start, f"### {section}", "", f"Command: `{command}` ({time.strftime('%Y-%m-%d')}, "
                          f"{os.cpu_count()} cores). {caption}", "", "```", *lines, "```", stop])
        if start in text and stop in text:
            text = text[:text.index(start)] + body + text[text.index(stop) + len(stop):]
        else:
            text = text.replace(END, body + "\n\n" + END)
    PERFORMANCE.write_text(text)


def numbers(text, kind):
    return [kind(x) for x in text.split(",")]


def main():
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections (default all: {','.join(SECTIONS)})")
    parser.add_argument("--ranks", type=lambda t: numbers(t, int), default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--rows", type=lambda t: numbers(t, int), default=[1000, 10000, 100000, 1000000])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-doc", action="store_true", help="leave docs/performance.md as it is")
    args = parser.parse_args()
    chosen = args.only.split(",")
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"--only: unknown section {unknown[0]} (known: {', '.join(SECTIONS)})")
    cores = os.cpu_count()
    OUT.mkdir(parents=True, exist_ok=True)
    blocks = {}
    with tempfile.TemporaryDirectory(prefix="granger-bench-") as tmp:
        for section in chosen:
            print(f"{section} ...", flush=True)
            caption, lines = RUNNERS[section](Path(tmp), args, cores)
            blocks[section] = (caption, lines)
            print("\n".join(lines), flush=True)
    if not args.no_doc:
        update_performance(blocks, " ".join(["scripts/bench", *sys.argv[1:]]))
        print(f"updated {PERFORMANCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
