"""Spare ranks on emulated hosts: the effective training time of a run that loses a rank
every ~30 s, and the cost of idle spares.

On 4 emulated hosts (``scripts/cluster``, one training rank and one spare per host), P = 4
with 4 spares under ULFM:

1. throughput without spares and with 4 idle spares (short runs, alternating);
2. an undisturbed run of N steps (N sized to ``--seconds``), checkpoints kept;
3. the same run with a training rank SIGKILLed every ``--every`` s while spares last and
   once more after (a shrink to P = 3).

Effective training time ratio = (steps committed x the undisturbed run's seconds per step)
/ (the disturbed run's training seconds, ``summary.json``'s ``train_seconds``: from the
loop's start to the end). The spare phase is checked bit for bit: the disturbed run's last
checkpoint before the shrink against the undisturbed run's at the same step. Writes
docs/bench/spares.csv and prints the figures.

    .venv/bin/python scripts/bench_spares.py [--seconds 300] [--every 30]
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import h5py
import numpy as np

import bench_common
from bench_common import ROOT

CLUSTER = str(ROOT / "scripts" / "cluster")
HOSTS = 4


def job(tmp, data, name, *, spares, steps, every_steps=200):
    return bench_common.write_job(tmp / f"{name}.toml", {
        "data": {"path": str(data)}, "model": {"kind": "mlp", "hidden": [256, 128]},
        "optimizer": {"learning_rate": 0.05, "momentum": 0.9},
        "train": {"global_batch": 256, "epochs": 1000, "max_steps": steps, "seed": 1,
                  "threads_per_rank": 1},
        "collectives": {"algorithm": "ring"},
        "checkpoint": {"every_steps": every_steps, "keep_last": 1000},
        "fault": {"spares": spares, "max_failures": 8, "step_timeout_s": 60.0},
        "output": {"run_dir": str(tmp / name), "progress_interval_s": 10.0}})


def start(job_path, spares):
    cmd = [CLUSTER, "run", "--ft", "--map-by", "node", "-n", str(HOSTS + spares), "--",
           bench_common.GRANGER, "train", str(job_path)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc, timeout):
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    return output


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def training_ranks(run_dir):
    """``{world rank: pid}`` of the ranks training now (their status files)."""
    ranks = {}
    for path in (run_dir / "status").glob("rank-*.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record["state"] in ("TRAINING", "AGGREGATING", "CHECKPOINTING"):
            ranks[record["rank"]] = record["pid"]
    return ranks


def kill_every(run_dir, proc, every_s, kills, rng, log):
    """SIGKILL a random training rank every ~``every_s`` seconds, ``kills`` times."""
    for _ in range(kills):
        deadline = time.time() + every_s * rng.uniform(0.8, 1.2)
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        ranks = training_ranks(run_dir)
        if proc.poll() is not None or not ranks:
            return
        victim = rng.choice(sorted(ranks))
        os.kill(ranks[victim], signal.SIGKILL)
        log.append((time.time(), victim))
        print(f"  killed world rank {victim} (pid {ranks[victim]})", flush=True)


def params_at(run_dir, step):
    path = run_dir / "ckpt" / f"step_{step:08d}.h5"
    with h5py.File(path, "r") as f:
        return np.concatenate([f["params"][name][...].ravel() for name in sorted(f["params"])])


def plot(csv_path, png_path):
    """Throughput with and without idle spares, and each failure's recovery split."""
    import csv
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(csv.DictReader(open(csv_path)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for spares in ("0", str(HOSTS)):
        values = [float(r["samples_per_s"]) for r in rows if r["run"] == "throughput" and r["spares"] == spares]
        left.bar(f"{spares} idle spares", np.median(values), yerr=[[np.median(values) - min(values)],
                                                                   [max(values) - np.median(values)]])
    left.set_ylabel("samples/s (median, min-max)")
    left.set_title("P = 4 on 4 emulated hosts")
    parts = ("detect_s", "revoke_s", "shrink_s", "agree_s", "transfer_s")
    failures = [r for r in rows if r["run"] == "event"]
    bottom = np.zeros(len(failures))
    for part in parts:
        values = np.array([float(r[part]) for r in failures])
        right.bar(range(len(failures)), values * 1e3, bottom=bottom, label=part[:-2])
        bottom += values * 1e3
    right.plot(range(len(failures)), [float(r["first_step_s"]) * 1e3 for r in failures], "k^",
               label="first step after")
    right.set_xticks(range(len(failures)), [f"step {r['steps']}\n{'spare' if r['spares'] != '0' else 'shrink'}"
                                            for r in failures])
    right.set_ylabel("ms")
    right.set_title("each failure of the 5-minute run")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="length of the disturbed run")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between kills")
    parser.add_argument("--rate", default=None, help="link rate of each emulated host (tc)")
    parser.add_argument("--reps", type=int, default=3, help="throughput runs with and without spares")
    parser.add_argument("--throughput-only", action="store_true", help="step 1 only")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "spares.csv")
    args = parser.parse_args()
    if args.plot_only:
        return plot(args.out, args.out.with_suffix(".png"))
    rng = random.Random(args.seed)
    up = [CLUSTER, "up", "--hosts", str(HOSTS), "--slots", "2"] + (["--rate", args.rate] if args.rate else [])
    subprocess.run(up, check=True)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            data = bench_common.make_dataset(tmp / "data.h5", rows=60000, features=64, classes=10, seed=2)
            # 1. throughput with and without idle spares
            for rep in range(args.reps):
                for spares in (0, HOSTS):
                    name = f"probe{rep}-{spares}"
                    out = finish(start(job(tmp, data, name, spares=spares, steps=400), spares), 600)
                    s = summary(tmp / name)
                    rows.append({"run": "throughput", "spares": spares, "rep": rep,
                                 "steps": s["steps"], "train_seconds": s["train_seconds"],
                                 "samples_per_s": s["samples_per_s"]})
                    print(f"throughput, {spares} idle spare(s): {s['samples_per_s']:,.0f} samples/s", flush=True)
                    assert s["steps"] == 400, out[-2000:]
            if args.throughput_only:
                return 0
            per_step = np.median([r["train_seconds"] / r["steps"] for r in rows if r["spares"] == HOSTS])
            steps = int(args.seconds / per_step)
            # 2. undisturbed, 3. disturbed
            out = finish(start(job(tmp, data, "undisturbed", spares=HOSTS, steps=steps), HOSTS), 3 * args.seconds)
            calm = summary(tmp / "undisturbed")
            assert calm["steps"] == steps, out[-3000:]
            proc = start(job(tmp, data, "disturbed", spares=HOSTS, steps=steps), HOSTS)
            kills = []
            killer = threading.Thread(target=kill_every, daemon=True,
                                      args=(tmp / "disturbed", proc, args.every, HOSTS + 1, rng, kills))
            killer.start()
            out = finish(proc, 4 * args.seconds)
            killer.join(5)
            rough = summary(tmp / "disturbed")
            complete = json.loads((tmp / "disturbed" / "COMPLETE").read_text())
            with h5py.File(tmp / "disturbed" / "metrics.h5", "r") as f:
                events = {name: f["events"][name][...].tolist() for name in f["events"]}
            ratio = rough["steps"] * (calm["train_seconds"] / calm["steps"]) / rough["train_seconds"]
            bare = np.median([r["train_seconds"] / r["steps"] for r in rows if r["spares"] == 0])
            ratio_bare = rough["steps"] * bare / rough["train_seconds"]
            # the spare phase, bit for bit: the last checkpoint before the shrink
            shrink_step = next((step for step, used in zip(events["step"], events["spares_used"])
                                if used == 0), steps)
            checked = max(s for s in range(0, shrink_step + 1, 200) if s > 0)
            same = np.array_equal(params_at(tmp / "disturbed", checked).view(np.uint32),
                                  params_at(tmp / "undisturbed", checked).view(np.uint32))
            rows.append({"run": "undisturbed", "spares": HOSTS, "steps": calm["steps"],
                         "train_seconds": calm["train_seconds"], "samples_per_s": calm["samples_per_s"]})
            rows.append({"run": "disturbed", "spares": HOSTS, "steps": rough["steps"],
                         "train_seconds": rough["train_seconds"], "samples_per_s": rough["samples_per_s"],
                         "kills": len(kills), "lost": " ".join(map(str, complete["lost_world_ranks"])),
                         "final_world_size": complete["world_size"], "ratio": round(ratio, 4),
                         "ratio_vs_no_spares": round(ratio_bare, 4),
                         "bitwise_at_step": checked, "bitwise": same})
            for i, step in enumerate(events["step"]):
                rows.append({"run": "event", "steps": step, "spares": events["spares_used"][i],
                             **{k: round(events[k][i], 4) for k in ("detect_s", "revoke_s", "shrink_s",
                                                                     "agree_s", "transfer_s", "recovery_s",
                                                                     "first_step_s")}})
            print(f"undisturbed: {calm['steps']} steps in {calm['train_seconds']:.1f} s; disturbed: "
                  f"{rough['steps']} steps in {rough['train_seconds']:.1f} s, {len(kills)} kill(s), lost "
                  f"{complete['lost_world_ranks']}, ending on {complete['world_size']} ranks")
            print(f"effective training time ratio: {100 * ratio:.1f}% (against the undisturbed run with "
                  f"its idle spares; {100 * ratio_bare:.1f}% against the short runs without spares)")
            print(f"spare phase bitwise equal to the undisturbed run at step {checked}: {same}")
            for i, step in enumerate(events["step"]):
                print(f"  failure at step {step}: spares used {events['spares_used'][i]}, detect "
                      f"{events['detect_s'][i]:.3f} s, revoke {events['revoke_s'][i]:.3f}, shrink "
                      f"{events['shrink_s'][i]:.3f}, agree {events['agree_s'][i]:.3f}, transfer "
                      f"{events['transfer_s'][i]:.3f}, first step after {events['first_step_s'][i]:.3f} s")
    finally:
        subprocess.run([CLUSTER, "down"])
        if rows:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            fields = list(dict.fromkeys(key for row in rows for key in row))
            bench_common.write_csv([{key: row.get(key, "") for key in fields} for row in rows], args.out)
            plot(args.out, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
