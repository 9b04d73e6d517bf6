"""Fault benchmarks: recovery time under ULFM at P = 2, 4, 8, and the time to finish a job
with 0, 1 and 2 failures under ULFM and under restart-from-checkpoint.

Failures are real (``--inject-failure ...,mode=kill9``: the rank SIGKILLs itself and prints
the wall-clock time first). Recovery is measured from that moment: detection (until a
survivor's MPI call fails), revoke+shrink+agree, and the first completed step after it,
from the events the survivors record in metrics.h5. Writes docs/bench/fault_*.csv and .png.
Both modes use the ring allreduce, so that only the fault handling differs (``auto`` picks
``shm`` without ULFM, whose fences spin: on 4 ranks sharing 2 loaded cores that alone made
the restart runs 5x slower).
P = 8 on a 2-core machine is oversubscribed (4 ranks per core); ULFM runs use TCP even
between ranks of one machine (docs/architecture.md, "Environment traps").
"""

import argparse
import csv
import re
import statistics
import tempfile
from pathlib import Path

import h5py

import bench_common
from bench_common import ROOT
from granger_mpi.mpi.ulfm import LAUNCH_FLAGS as ULFM_FLAGS

ENV = bench_common.YIELDING      # the restart runs use shared memory, the ULFM runs TCP
MPIRUN = [bench_common.MPIRUN]


def train(tmp, data, name, ranks, mode, injections, epochs):
    """Run one job; returns (wall seconds, stdout+stderr, run directory)."""
    run_dir = tmp / name
    job = bench_common.write_job(tmp / f"{name}.toml", {
        "data": {"path": str(data)}, "model": {"kind": "mlp", "hidden": [128, 64]},
        "optimizer": {"learning_rate": 0.05, "momentum": 0.9},
        "train": {"global_batch": 256, "epochs": epochs, "seed": 1},
        "collectives": {"algorithm": "ring"}, "checkpoint": {"every_steps": 100},
        "fault": {"mode": mode}, "output": {"run_dir": str(run_dir), "progress_interval_s": 1000.0}})
    inject = [f"--inject-failure=rank={r},step={s},mode=kill9" for r, s in injections]
    if mode == "ulfm":
        cmd = [*MPIRUN, "-n", str(ranks), *ULFM_FLAGS, bench_common.GRANGER, "train", str(job), *inject]
    else:   # the restart path: granger-mpi run under supervise, no ULFM
        cmd = [bench_common.GRANGER, "run", str(job), "-n", str(ranks), "--max-restarts", "3",
               "--backoff", "0", "--mpirun", bench_common.MPIRUN, *inject]
    run = bench_common.train(job, ranks, run_dir=run_dir, command=cmd, env=ENV, timeout=600,
                             lost_ranks=bool(injections))
    return run.wall_s, run.output, run_dir


def recovery(text, run_dir):
    """(detection, revoke+shrink+agree, failure to first completed step after it) in s."""
    killed = float(re.search(r"inject: .* t=([\d.]+)", text).group(1))
    with h5py.File(run_dir / "metrics.h5", "r") as f:
        events = f["events"]
        detected, shrink, first = (float(events[k][0]) for k in ("time", "recovery_s", "first_step_s"))
    return detected - killed, shrink, detected + first - killed


def summary(values):
    return statistics.median(values), min(values), max(values)


def plot(rows, impact, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ps = sorted({r["ranks"] for r in rows})
    for key, label in (("detect_s", "detection"), ("shrink_s", "revoke+shrink+agree"),
                       ("first_step_s", "failure -> first step after")):
        med = [statistics.median(r[key] for r in rows if r["ranks"] == p) for p in ps]
        left.plot(ps, med, "o-", label=label)
    left.set(xlabel="ranks (P = 8 oversubscribed on 2 cores)", ylabel="seconds (median)",
             title="ULFM recovery after a SIGKILLed rank", xticks=ps)
    left.legend()
    labels = [f"{m}\n{n} failure(s)" for m, n, _ in impact]
    right.bar(range(len(impact)), [statistics.median(s) for _, _, s in impact],
              yerr=[[statistics.median(s) - min(s) for _, _, s in impact],
                    [max(s) - statistics.median(s) for _, _, s in impact]], capsize=4,
              color=["tab:blue" if m == "ulfm" else "tab:orange" for m, _, _ in impact])
    right.set_xticks(range(len(impact)), labels, fontsize=8)
    right.set(ylabel="seconds to finish (median, min-max)", title="Fault impact, P = 4")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    parser.add_argument("--impact-only", action="store_true",
                        help="skip the recovery runs; tabulate the last fault_recovery.csv")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "train.h5"
        bench_common.make_dataset(data, rows=20000, features=32, classes=10, seed=3)
        rows = []
        for rep in range(0 if args.impact_only else args.reps):
            for ranks in (2, 4, 8):
                _, text, run_dir = train(tmp, data, f"rec-{ranks}-{rep}", ranks, "ulfm",
                                         [(ranks - 1, 200)], epochs=4)
                detect, shrink, first = recovery(text, run_dir)
                rows.append({"ranks": ranks, "rep": rep, "detect_s": detect, "shrink_s": shrink,
                             "first_step_s": first})
                print(f"P={ranks} rep {rep}: detection {detect:.3f} s, revoke+shrink+agree "
                      f"{shrink:.3f} s, failure -> first step after {first:.3f} s", flush=True)
        if args.impact_only:
            with open(args.out / "fault_recovery.csv") as f:
                rows = [{k: float(v) if k.endswith("_s") else int(v) for k, v in row.items()}
                        for row in csv.DictReader(f)]
        else:
            with open(args.out / "fault_recovery.csv", "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        plans = {0: [], 1: [(3, 250)], 2: [(3, 250), (2, 550)]}
        seconds = {(mode, n): [] for mode in ("ulfm", "restart") for n in plans}
        for rep in range(args.reps):      # interleaved: a change of load hits every variant
            for mode, failures in seconds:
                s, _, _ = train(tmp, data, f"imp-{mode}-{failures}-{rep}", 4, mode,
                                plans[failures], epochs=10)
                seconds[mode, failures].append(s)
                print(f"{mode} with {failures} failure(s), rep {rep}: {s:.1f} s", flush=True)
        impact = [(mode, n, values) for (mode, n), values in seconds.items()]
        with open(args.out / "fault_impact.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["mode", "failures", "rep", "seconds"])
            for mode, failures, seconds in impact:
                writer.writerows([mode, failures, rep, s] for rep, s in enumerate(seconds))
    plot(rows, impact, args.out / "fault.png")
    print("\n| P | detection s | revoke+shrink+agree s | failure -> first step after s |")
    print("|---|---|---|---|")
    for ranks in (2, 4, 8):
        cells = [summary([r[k] for r in rows if r["ranks"] == ranks])
                 for k in ("detect_s", "shrink_s", "first_step_s")]
        print(f"| {ranks} | " + " | ".join(f"{m:.3f} ({lo:.3f}-{hi:.3f})" for m, lo, hi in cells) + " |")
    base = {mode: statistics.median(s) for mode, n, s in impact if n == 0}
    print("\n| mode | failures | seconds to finish, median (min-max) | vs no failure |")
    print("|---|---|---|---|")
    for mode, failures, seconds in impact:
        m, lo, hi = summary(seconds)
        print(f"| {mode} | {failures} | {m:.1f} ({lo:.1f}-{hi:.1f}) | {m / base[mode]:.2f}x |")


if __name__ == "__main__":
    main()
