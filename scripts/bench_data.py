#!/usr/bin/env python3
"""Rank-owned partitions (issue #25), measured side by side in one run.

* planning one epoch of 10^9 rows for one rank of P = 1024 (time and peak memory);
* the disk: ``dd bs=4M`` of the dataset after a page-cache drop, against the loader alone
  (``BatchStream`` streaming all lanes at P = 1, same file, same cache drop);
* the checksum check's cost per epoch (CRC32 of every block, in memory);
* training a 784-512-256-10 MLP at P = 2 and 4 with the data in memory against the same job
  with a memory budget a quarter of the file's share per rank (the file is four times the
  sum of the budgets: streamed), the page cache dropped before each run;
* peak RSS per rank (``/usr/bin/time -v`` under ``mpirun -n 4``) with the data in memory,
  against the same job on a tiny file (the process baseline).

Needs root for ``/proc/sys/vm/drop_caches``. Writes ``OUT/data.csv`` and ``OUT/data.png``;
prints the figures for docs/performance.md.

    python scripts/bench_data.py --reps 3
"""

import argparse
import csv
import os
import re
import statistics
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MPIRUN = [str(ROOT / "scripts" / "mpirun")]
GRANGER = [sys.executable, "-m", "granger_mpi"]


def drop_caches():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def run(cmd, **kwargs):
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(map(str, cmd))}\n{done.stdout}\n{done.stderr}")
    return done


def make_data(path, rows, features):
    if not path.exists():
        run([*MPIRUN, "-n", "2", *GRANGER, "make-dataset", path, "--rows", rows, "--features",
             features, "--classes", "10", "--seed", "1"])
    return path


def bench_planning(reps):
    from granger_mpi.data import partition
    out = []
    for _ in range(reps):
        tracemalloc.start()
        started = time.perf_counter()
        partition.EpochPlan.make(10**9, 1024, 1, 0, window=83, world_size=1024, rank=517)
        seconds = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        out.append((seconds, peak / 1e6))
    return out


def bench_dd(path):
    drop_caches()
    started = time.perf_counter()
    run(["dd", f"if={path}", "of=/dev/null", "bs=4M"])
    return path.stat().st_size / (time.perf_counter() - started) / 1e6


LOADER = """
import sys, time
from granger_mpi.data import dataset
info = dataset.open_info(sys.argv[1])
started = time.perf_counter()
with dataset.BatchStream(info, 256, 0, 1, 0, epochs=1, memory_budget_bytes=int(sys.argv[2])) as s:
    assert not s.in_memory
    rows = sum(item[3].size for item in s)
assert rows == info.n_rows
print(info.n_rows * info.row_bytes / (time.perf_counter() - started) / 1e6)
"""


def bench_loader(path, budget):
    drop_caches()
    return float(run([sys.executable, "-c", LOADER, path, budget], cwd=ROOT).stdout.split()[-1])


def bench_crc(path):
    import h5py
    import numpy as np
    from granger_mpi.data import integrity
    with h5py.File(path) as f:
        X = f["X"][...]
        block = int(f[integrity.GROUP].attrs["block_rows"])
    started = time.perf_counter()
    integrity.block_crcs(X, block)
    seconds = time.perf_counter() - started
    return seconds, X.nbytes / seconds / 1e9, np.dtype(X.dtype).itemsize


def job(path, data, run_dir, budget_mb):
    path.write_text(f"""[data]
path = "{data}"
memory_budget_mb = {budget_mb}
[model]
kind = "mlp"
hidden = [512, 256]
[optimizer]
learning_rate = 0.05
momentum = 0.9
[train]
global_batch = 256
epochs = 1
[output]
run_dir = "{run_dir}"
progress_interval_s = 1000
""")
    return path


def train(ranks, job_path, timed=False):
    drop_caches()
    cmd = [*MPIRUN, "-n", ranks]
    if timed:
        cmd += ["/usr/bin/time", "-v"]
    done = run([*cmd, *GRANGER, "train", job_path, "--overwrite"], cwd=ROOT)
    rate = float(re.findall(r"([\d,]+) samples/s", done.stdout)[-1].replace(",", ""))
    modes = re.findall(r"data: rank \d+: .*?, (in memory|streamed)", done.stdout)
    rss = [int(kb) / 1024 for kb in re.findall(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)]
    return rate, modes, rss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=342_000, help="rows of the 784-feature file (1 GiB)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=ROOT / "runs" / "bench-data")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    data = make_data(args.dir / "data.h5", args.rows, 784)
    tiny = make_data(args.dir / "tiny.h5", 2048, 784)
    size_mb = data.stat().st_size / 2**20
    rows = []

    def record(measure, ranks, mode, rep, value):
        rows.append({"measure": measure, "ranks": ranks, "mode": mode, "rep": rep, "value": value})

    for rep, (seconds, peak) in enumerate(bench_planning(args.reps)):
        record("plan_1e9_rows_s", 1024, "", rep, seconds)
        record("plan_1e9_rows_peak_mb", 1024, "", rep, peak)
    crc_s, crc_gbs, _ = bench_crc(data)
    record("crc_epoch_s", 1, "", 0, crc_s)
    stream_budget = int(size_mb / 4 * 2**20)
    for rep in range(args.reps):     # alternating: the disk, then the loader
        record("dd_MBps", 1, "dd bs=4M", rep, bench_dd(data))
        record("loader_MBps", 1, "streamed", rep, bench_loader(data, stream_budget))
    for ranks in (2, 4):
        budgets = {"in memory": 4 * size_mb, "streamed": size_mb / 4 / ranks}
        for rep in range(args.reps):
            for mode, budget in budgets.items():
                rate, modes, _ = train(ranks, job(args.dir / f"{ranks}.toml", data,
                                                  args.dir / f"run{ranks}", round(budget, 1)))
                assert set(modes) == {mode}, (mode, modes)
                record("train_samples_per_s", ranks, mode, rep, rate)
    _, _, rss = train(4, job(args.dir / "rss.toml", data, args.dir / "rss", 4 * size_mb), timed=True)
    _, _, base = train(4, job(args.dir / "base.toml", tiny, args.dir / "base", 4 * size_mb), timed=True)
    for rank, (a, b) in enumerate(zip(rss, base)):
        record("peak_rss_mb", 4, "in memory", rank, a)
        record("baseline_rss_mb", 4, "tiny file", rank, b)

    with open(args.out / "data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["measure", "ranks", "mode", "rep", "value"])
        writer.writeheader()
        writer.writerows(rows)

    def values(measure, ranks=None, mode=None):
        return [r["value"] for r in rows if r["measure"] == measure
                and (ranks is None or r["ranks"] == ranks) and (mode is None or r["mode"] == mode)]

    def summary(vs):
        return f"{statistics.median(vs):,.1f} (min {min(vs):,.1f}, max {max(vs):,.1f})"

    print(f"dataset {data}: {size_mb:,.0f} MiB, {args.rows:,} rows x 784 float32")
    print(f"plan one epoch of 10^9 rows, rank 517 of 1024: {summary(values('plan_1e9_rows_s'))} s, "
          f"peak {summary(values('plan_1e9_rows_peak_mb'))} MB")
    print(f"checksum check of one epoch: {crc_s:.2f} s of CRC32 ({crc_gbs:.1f} GB/s)")
    dd, loader = values("dd_MBps"), values("loader_MBps")
    print(f"cold read: dd bs=4M {summary(dd)} MB/s, loader (streamed, P=1) {summary(loader)} MB/s: "
          f"{statistics.median(loader) / statistics.median(dd):.0%} of dd")
    for ranks in (2, 4):
        held = values("train_samples_per_s", ranks, "in memory")
        streamed = values("train_samples_per_s", ranks, "streamed")
        print(f"train P={ranks}: in memory {summary(held)} samples/s, streamed (budget "
              f"{size_mb / 4 / ranks:.0f} MiB per rank, cold cache) {summary(streamed)} samples/s: "
              f"{statistics.median(streamed) / statistics.median(held):.0%}")
    share = size_mb / 4
    for rank, (a, b) in enumerate(zip(rss, base)):
        print(f"peak RSS rank {rank} at P=4 in memory: {a:,.0f} MiB = baseline {b:,.0f} + "
              f"{a - b:,.0f} (a quarter of the file: {share:,.0f} MiB)")
    plot(args.out / "data.png", values, size_mb)


def plot(path, values, size_mb):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    labels, meds, errs = [], [], []
    for label, vs in (("dd bs=4M", values("dd_MBps")), ("loader", values("loader_MBps"))):
        labels.append(label)
        meds.append(statistics.median(vs))
        errs.append([[meds[-1] - min(vs)], [max(vs) - meds[-1]]])
    left.bar(labels, meds, yerr=[[e[0][0] for e in errs], [e[1][0] for e in errs]], capsize=4)
    left.set_ylabel("MB/s after a page-cache drop")
    left.set_title(f"Cold read of a {size_mb:,.0f} MiB file")
    xs = []
    for i, ranks in enumerate((2, 4)):
        for j, mode in enumerate(("in memory", "streamed")):
            vs = values("train_samples_per_s", ranks, mode)
            med = statistics.median(vs)
            right.bar(i * 3 + j, med, yerr=[[med - min(vs)], [max(vs) - med]], capsize=4,
                      color="C0" if j == 0 else "C1", label=mode if i == 0 else None)
            xs.append(i * 3 + j)
    right.set_xticks([0.5, 3.5], ["P = 2", "P = 4"])
    right.set_ylabel("samples/s (784-512-256-10 MLP)")
    right.set_title("Training, cold cache: in memory vs streamed")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
