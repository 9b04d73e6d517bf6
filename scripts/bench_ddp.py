"""granger-mpi against PyTorch DistributedDataParallel (gloo), side by side in one run.

Both train the same MLP from the same initial parameters on the same rows in the same
order (see ``bench_ddp_torch.py``), with the same global batch, epochs, SGD with momentum
and weight decay, and the same threads per rank, launched by the same ``scripts/mpirun``
at each P. Repetitions alternate which side goes first, so that the machine's other load
hits both alike. Throughput = rows x epochs / training-loop seconds (granger-mpi's
``train_seconds`` in ``RUN_DIR/summary.json``, which excludes start-up and the test
evaluation; DDP's loop between two barriers, data already in memory). Final accuracy is on
the test file.

Writes ``OUT/ddp{TAG}.csv`` (one row per run) and ``OUT/ddp{TAG}.png``; prints the table.
"""

import argparse
import csv
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import bench_common
from bench_common import MPIRUN, PYTHON, ROOT
from granger_mpi.mpi.threads import default_threads

ACCURACY_TOLERANCE_POINTS = 0.5
SIDE_ORDER = ["granger-mpi", "ddp-gloo", "granger-mpi bf16", "ddp-gloo fp16"]
COLOURS = ["#08519c", "#e6550d", "#6baed6", "#fdae6b"]

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def threads_per_rank(ranks):
    """What ``granger-mpi`` gives each rank: a share of the cores."""
    return default_threads(len(os.sched_getaffinity(0)), ranks)


def run(cmd, env=None, timeout=900):
    """``cmd``'s output; one failed run is retried (gloo at P = 4 across the emulated hosts
    sometimes aborts in its teardown, "terminate called without an active exception"), and
    said so; a second failure ends the benchmark."""
    for attempt in (1, 2):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        if done.returncode == 0:
            return done.stdout
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        print(f"  bench-ddp: run failed ({done.returncode}), attempt {attempt} of 2: {' | '.join(tail)}",
              flush=True)
    sys.exit(f"bench-ddp: {' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


MPIRUN_ARGS = []   # --mpirun-arg: extra launcher flags, the same for both sides
CLUSTER = ROOT / "scripts" / "cluster"
ACROSS = {}        # --cluster: {"hosts": N, "address": host 1's}; both sides run across them


def launcher(ranks):
    """How both sides are started at P = ``ranks``: scripts/mpirun, or across the emulated
    hosts one rank per host in turn (``--map-by node``)."""
    if ACROSS:
        return [PYTHON, str(CLUSTER), "run", "-n", str(ranks), "--map-by", "node", "--"]
    return [MPIRUN, "-n", str(ranks), *MPIRUN_ARGS]


def run_granger(job, ranks, run_dir):
    """The training loop's seconds (start-up and the test evaluation left out) and the test
    accuracy in %, from the run's summary.json."""
    summary = bench_common.train(job, ranks, run_dir=run_dir, args=["--overwrite"], timeout=900,
                                 command=[*launcher(ranks), bench_common.GRANGER, "train",
                                          str(job), "--overwrite"]).summary
    return summary["train_seconds"], 100 * summary["test_accuracy"]


def run_torch(args, data, test, ranks, hook):
    out = run([*launcher(ranks), "env", f"PYTHONPATH={ROOT / '.bench-site'}", PYTHON,
               str(ROOT / "scripts" / "bench_ddp_torch.py"), str(data), str(test),
               "--hidden", args.hidden, "--batch", str(args.batch), "--epochs", str(args.epochs),
               "--lr", str(args.lr), "--momentum", str(args.momentum),
               "--weight-decay", str(args.weight_decay), "--seed", str(args.seed),
               "--port", str(free_port()), "--threads", str(threads_per_rank(ranks)),
               "--address", ACROSS.get("address", "127.0.0.1"), "--hook", hook])
    result = json.loads(re.search(r"^RESULT (.*)$", out, re.M).group(1))
    return result["seconds"], 100 * result["test_accuracy"]


def comparisons(impls, target):
    """``(ours, theirs, target ratio)`` for the sides present: plain against plain at
    ``target``; bf16 against DDP's default at 1.5x and against DDP compressed at 1.0x (its
    fp16 hook: torch 2.13 refuses ``bf16_compress_hook`` without CUDA/NCCL or XPU/XCCL,
    and fp16 sends as few bytes)."""
    found = [("granger-mpi", "ddp-gloo", target)]
    if "granger-mpi bf16" in impls:
        found += [("granger-mpi bf16", "ddp-gloo", 1.5), ("granger-mpi bf16", "ddp-gloo fp16", 1.0)]
    return [c for c in found if c[0] in impls and c[1] in impls]


def summarize(rows, ranks_list, compared):
    """Per P: medians and spreads per side, then each comparison's ratio and verdict."""
    lines = []
    verdicts = {}
    impls = sorted({r["impl"] for r in rows}, key=SIDE_ORDER.index)
    for ranks in ranks_list:
        sides = {}
        for impl in impls:
            mine = [r for r in rows if r["impl"] == impl and r["ranks"] == ranks]
            rates = [r["samples_per_s"] for r in mine]
            accs = [r["test_accuracy_pct"] for r in mine]
            sides[impl] = (statistics.median(rates), min(rates), max(rates), statistics.median(accs),
                           min(accs), max(accs))
            lines.append(f"P={ranks}  {impl:<16} samples/s median {sides[impl][0]:>9,.0f}  "
                         f"[{sides[impl][1]:,.0f} - {sides[impl][2]:,.0f}]  test accuracy median "
                         f"{sides[impl][3]:.2f}% [{sides[impl][4]:.2f} - {sides[impl][5]:.2f}]")
        # The runs of one repetition ran back to back under the same outside load: their
        # ratio is less disturbed by that load than a ratio of medians over all repetitions.
        pairs = {}
        for r in rows:
            if r["ranks"] == ranks:
                pairs.setdefault(r["rep"], {})[r["impl"]] = r["samples_per_s"]
        for ours, theirs, target in compared:
            ratio = sides[ours][0] / sides[theirs][0]
            paired = sorted(p[ours] / p[theirs] for p in pairs.values() if ours in p and theirs in p)
            gap = sides[ours][3] - sides[theirs][3]
            met = ratio >= target and abs(gap) <= ACCURACY_TOLERANCE_POINTS
            verdicts[ranks, ours, theirs] = (ratio, gap, met)
            lines.append(f"P={ranks}  {ours} / {theirs} (median samples/s): {ratio:.2f}x; per "
                         f"repetition: {', '.join(f'{x:.2f}' for x in paired)} (median "
                         f"{statistics.median(paired):.2f}x); accuracy difference {gap:+.2f} points; "
                         f"target >= {target}x at equal accuracy: {'MET' if met else 'NOT MET'}")
    return lines, verdicts


def plot(rows, ranks_list, path):
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    impls = sorted({r["impl"] for r in rows}, key=SIDE_ORDER.index)
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        colour = COLOURS[SIDE_ORDER.index(impl)]
        med, lo, hi = [], [], []
        for ranks in ranks_list:
            rates = [r["samples_per_s"] for r in rows if r["impl"] == impl and r["ranks"] == ranks]
            m = statistics.median(rates)
            med.append(m)
            lo.append(m - min(rates))
            hi.append(max(rates) - m)
        x = np.arange(len(ranks_list)) + (k - (len(impls) - 1) / 2) * width
        ax.bar(x, med, width, yerr=[lo, hi], capsize=4, color=colour, label=impl)
    ax.set_xticks(np.arange(len(ranks_list)), [f"P = {p}" for p in ranks_list])
    ax.set_ylabel("samples/s (median, bars: min-max)")
    ax.set_title("MLP training throughput: granger-mpi vs PyTorch DDP (gloo), same job")
    ax.legend()
    ax.grid(True, axis="y", alpha=0.3)
    fig.savefig(path)


def cluster_up(args, most_ranks):
    """``scripts/cluster up`` with enough slots for ``most_ranks``; notes host 1's address."""
    up = subprocess.run([PYTHON, str(CLUSTER), "up", "--hosts", str(args.cluster), "--slots",
                         str(-(-most_ranks // args.cluster)), *(["--rate", args.rate] if args.rate else [])],
                        capture_output=True, text=True)
    if up.returncode != 0:
        sys.exit(f"bench-ddp: scripts/cluster up failed:\n{up.stdout}{up.stderr}")
    state = Path(os.environ.get("GRANGER_CLUSTER_DIR", "/run/granger-cluster")) / "state.json"
    ACROSS.update(hosts=args.cluster, address=json.loads(state.read_text())["addresses"][0])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("--ranks", default="2,4", help="comma-separated P (default 2,4)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per side and P (default 3)")
    parser.add_argument("--rows", type=int, default=60000)
    parser.add_argument("--test-rows", type=int, default=10000)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--hidden", default="128,64", help="hidden layer widths (default 128,64)")
    parser.add_argument("--batch", type=int, default=256, help="global batch (default 256)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench"), help="folder for ddp.csv/png")
    parser.add_argument("--mpirun-arg", action="append", default=[], metavar="ARG",
                        help="extra scripts/mpirun argument for both sides (repeatable), e.g. "
                             "--mpirun-arg=--mca --mpirun-arg=mpi_yield_when_idle --mpirun-arg=1")
    parser.add_argument("--tag", default="", help="suffix of the CSV/PNG names, e.g. _yield")
    parser.add_argument("--cluster", type=int, metavar="HOSTS",
                        help="run both sides across this many emulated hosts (scripts/cluster up, "
                             "as root; one rank per host in turn), brought down at the end")
    parser.add_argument("--rate", default=None, help="with --cluster: each host's link, e.g. 1gbit")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="a setting of granger-mpi's job (repeatable), e.g. collectives.bucket_mb=0")
    parser.add_argument("--bf16", action="store_true",
                        help="two more sides: granger-mpi with [collectives].compression = 'bf16', and "
                             "DDP with its fp16_compress_hook (the same bytes; its bf16 hook needs NCCL)")
    parser.add_argument("--sides", default=None, metavar="SIDE,...",
                        help=f"run only these sides (of {', '.join(SIDE_ORDER)}); e.g. granger-mpi "
                             f"alone for the step model's measurements, which need no PyTorch")
    parser.add_argument("--target", type=float, default=None,
                        help="the ratio granger-mpi / ddp-gloo to reach (default 1.05 with --cluster, "
                             "where the link bounds both, else 2.0)")
    parser.add_argument("--from-csv", type=Path, metavar="CSV",
                        help="run nothing: print the table and redraw the PNG from an earlier ddp.csv")
    args = parser.parse_args()
    target = args.target or (1.05 if args.cluster else 2.0)
    ranks_list = [int(p) for p in args.ranks.split(",")]
    MPIRUN_ARGS.extend(args.mpirun_arg)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.from_csv:
        with open(args.from_csv, newline="") as f:
            rows = [dict(r, ranks=int(r["ranks"]), rep=int(r["rep"]), samples_per_s=float(r["samples_per_s"]),
                         test_accuracy_pct=float(r["test_accuracy_pct"])) for r in csv.DictReader(f)]
        impls = {r["impl"] for r in rows}
        print("\n".join(summarize(rows, ranks_list, comparisons(impls, target))[0]))
        plot(rows, ranks_list, out / f"ddp{args.tag}.png")
        return
    (ROOT / "runs").mkdir(exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=ROOT / "runs", prefix="bench-ddp-") as tmp:
        tmp = Path(tmp)
        data = tmp / "train.h5"
        bench_common.make_dataset(data, rows=args.rows, features=args.features, classes=args.classes,
                                  seed=7, test_rows=args.test_rows, clusters=3, separation=1.0)
        test = tmp / "train-test.h5"
        sections = {
            "data": {"path": str(data), "test_path": str(test)},
            "model": {"kind": "mlp", "hidden": [int(h) for h in args.hidden.split(",")],
                      "activation": "relu"},
            "optimizer": {"learning_rate": args.lr, "momentum": args.momentum,
                          "weight_decay": args.weight_decay},
            "train": {"global_batch": args.batch, "epochs": args.epochs, "seed": args.seed},
            "output": {"run_dir": str(tmp / "run"), "progress_interval_s": 100000.0},
            "checkpoint": {"at_end": False}}
        for setting in args.set:       # granger-mpi's side only
            key, _, value = setting.partition("=")
            section, _, name = key.partition(".")
            try:
                value = tomllib.loads(f"v = {value}")["v"]
            except tomllib.TOMLDecodeError:
                pass    # a bare string
            sections.setdefault(section, {})[name] = value
        job = bench_common.write_job(tmp / "job.toml", sections)
        packed = dict(sections, collectives=dict(sections.get("collectives", {}), compression="bf16"))
        jobs = {"granger-mpi": job,
                "granger-mpi bf16": bench_common.write_job(tmp / "job-bf16.toml", packed)}
        hooks = {"ddp-gloo": "none", "ddp-gloo fp16": "fp16"}
        impls = SIDE_ORDER if args.bf16 else SIDE_ORDER[:2]
        if args.sides:
            wanted = args.sides.split(",")
            unknown = [w for w in wanted if w not in SIDE_ORDER]
            if unknown:
                sys.exit(f"bench-ddp: --sides: unknown {', '.join(unknown)}; known: {', '.join(SIDE_ORDER)}")
            impls = [i for i in SIDE_ORDER if i in wanted]
        if any(i not in jobs for i in impls) and not (ROOT / ".bench-site" / "torch").is_dir():
            sys.exit("bench-ddp: PyTorch missing: .venv/bin/pip install --target .bench-site torch==2.13.0 "
                     "(or --sides granger-mpi)")
        if args.cluster:
            cluster_up(args, max(ranks_list))
        try:
            samples = args.rows * args.epochs
            steps = -(-args.rows // args.batch) * args.epochs
            print(f"bench-ddp: MLP {args.features},{args.hidden},{args.classes}, {args.rows:,} rows x "
                  f"{args.epochs} epochs, global batch {args.batch}, P = {ranks_list}, {args.reps} reps, "
                  + (f"across {args.cluster} emulated hosts (link {args.rate or 'unshaped'}), "
                     if args.cluster else f"mpirun {' '.join(MPIRUN_ARGS) or '(scripts/mpirun as is)'}, ")
                  + f"granger-mpi settings {args.set or 'as is'}, sides {', '.join(impls)}; "
                  f"load average at start {os.getloadavg()[0]:.2f}", flush=True)
            for rep in range(args.reps):
                for ranks in ranks_list:
                    for impl in (impls if rep % 2 == 0 else impls[::-1]):
                        load = os.getloadavg()[0]
                        if impl in jobs:
                            seconds, accuracy = run_granger(jobs[impl], ranks, tmp / "run")
                        else:
                            seconds, accuracy = run_torch(args, data, test, ranks, hooks[impl])
                        row = {"impl": impl, "ranks": ranks, "rep": rep, "threads_per_rank": threads_per_rank(ranks),
                               "hosts": args.cluster or 1, "link": args.rate or "", "steps": steps,
                               "seconds": round(seconds, 4), "samples_per_s": round(samples / seconds, 1),
                               "test_accuracy_pct": round(accuracy, 3), "load1_before": round(load, 2),
                               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
                        rows.append(row)
                        print(f"  rep {rep} P={ranks} {impl:<16} {seconds:7.2f} s  {samples / seconds:9,.0f} "
                              f"samples/s  test accuracy {accuracy:.2f}%  (load {load:.2f})", flush=True)
        finally:
            if args.cluster:
                subprocess.run([PYTHON, str(CLUSTER), "down"], capture_output=True)
    bench_common.write_csv(rows, out / f"ddp{args.tag}.csv")
    lines, _ = summarize(rows, ranks_list, comparisons(impls, target))
    print("\n".join(lines))
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    plot(rows, ranks_list, out / f"ddp{args.tag}.png")
    print(f"wrote {out / f'ddp{args.tag}.csv'} and {out / f'ddp{args.tag}.png'}")


if __name__ == "__main__":
    main()
