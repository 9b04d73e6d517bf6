"""Chaos benchmark: many ULFM runs at P = 4, each with one rank SIGKILLed from outside at a
random moment (random rank, random algorithm), and the count that finished correctly.

Correct means: exit code 0 and COMPLETE for all steps; the world rank killed recorded as
lost (or nobody lost, when the kill came after the run's end); every sample used exactly
once per epoch (row logs, a redone step counted from its newest generation); metrics.h5
and metrics.jsonl holding every step exactly once. Writes docs/bench/chaos.csv.

    .venv/bin/python scripts/bench_chaos.py --runs 50
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

import bench_common
from bench_common import ROOT
from granger_mpi.mpi.ulfm import LAUNCH_FLAGS
from granger_mpi.training.setup import row_uses

ALGORITHMS = ("rd", "ring", "rhd", "native")
EPOCHS, ROWS, BATCH = 24, 4000, 64


def rank_pids(job):
    """``{world rank: pid}`` of the ranks running ``job``."""
    found = subprocess.run(["pgrep", "-f", f"granger-mpi train {job}"], capture_output=True,
                           text=True).stdout.split()
    pids = {}
    for pid in found:
        try:
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"OMPI_COMM_WORLD_RANK="):
                pids[int(item.split(b"=")[1])] = int(pid)
    return pids


def rows_once(log_dir):
    uses = row_uses(log_dir)
    return set(uses.values()) == {1} and len(uses) == EPOCHS * ROWS


def one_run(tmp, data, index, rng, span_s):
    """One run with a kill ``0..span_s`` s after training starts (``span_s`` None: no kill);
    returns its row and the seconds from the start of training to the end."""
    algorithm, victim = rng.choice(ALGORITHMS), rng.randrange(4)
    delay = rng.uniform(0.0, span_s or 0.0)
    run_dir, log_dir = tmp / f"run{index}", tmp / f"rows{index}"
    log_dir.mkdir()
    job = bench_common.write_job(tmp / f"job{index}.toml", {
        "data": {"path": str(data)}, "model": {"kind": "mlp", "hidden": [256, 128]},
        "optimizer": {"learning_rate": 0.05, "momentum": 0.9},
        "train": {"global_batch": BATCH, "epochs": EPOCHS, "seed": 1},
        "collectives": {"algorithm": algorithm},
        "checkpoint": {"every_steps": 25, "keep_last": 2},
        "fault": {"step_timeout_s": 30.0},
        "output": {"run_dir": str(run_dir), "progress_interval_s": 1000.0, "jsonl": True,
                   "timing_every_steps": 10}})
    cmd = [bench_common.MPIRUN, "-n", "4", *LAUNCH_FLAGS, bench_common.GRANGER, "train", str(job),
           "--row-log", str(log_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    output, started = [], threading.Event()

    def read():
        for line in proc.stdout:
            output.append(line)
            if "fault tolerance: ULFM" in line:
                started.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    killed = None
    if started.wait(60):
        begun = time.perf_counter()
        time.sleep(delay)
        pid = rank_pids(job).get(victim) if span_s else None
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            killed = victim
    try:
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    reader.join(5)
    span = time.perf_counter() - begun if started.is_set() else 0.0
    return check(run_dir, log_dir, proc.returncode, killed, algorithm, delay, "".join(output)), span


def check(run_dir, log_dir, code, killed, algorithm, delay, output):
    problems = []
    complete = run_dir / "COMPLETE"
    steps = EPOCHS * -(-ROWS // BATCH)
    if code != 0:
        problems.append(f"exit {code}")
    if not complete.exists():
        problems.append("no COMPLETE")
    else:
        record = json.loads(complete.read_text())
        if record["steps"] != steps:
            problems.append(f"{record['steps']} steps")
        if record["lost_world_ranks"] not in ([killed], []):
            problems.append(f"lost {record['lost_world_ranks']}")
        lost = record["lost_world_ranks"]
        if not rows_once(log_dir):
            problems.append("a sample not used exactly once")
        with h5py.File(run_dir / "metrics.h5", "r") as f:
            if f["step"][...].tolist() != list(range(steps)):
                problems.append("metrics.h5 steps")
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        if [r["step"] for r in lines if r["type"] == "step"] != list(range(steps)):
            problems.append("metrics.jsonl steps")
    row = {"algorithm": algorithm, "victim": killed, "delay_s": round(delay, 3),
           "lost": "" if not complete.exists() else " ".join(map(str, lost)),
           "correct": not problems, "problems": "; ".join(problems)}
    if problems:
        row["tail"] = output[-1500:].replace("\n", " | ")
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench" / "chaos.csv")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="granger-chaos-") as tmp:
        tmp = Path(tmp)
        data = bench_common.make_dataset(tmp / "data.h5", rows=ROWS, features=32, classes=4, seed=3)
        _, span_s = one_run(tmp, data, "-undisturbed", rng, None)
        print(f"an undisturbed run trains for {span_s:.2f} s; kills fall in 0..{0.9 * span_s:.2f} s")
        for index in range(args.runs):
            row, _ = one_run(tmp, data, index, rng, 0.9 * span_s)
            rows.append(row)
            print(f"run {index + 1}/{args.runs}: {row['algorithm']} rank {row['victim']} "
                  f"after {row['delay_s']} s, lost [{row['lost']}]: "
                  f"{'correct' if row['correct'] else row['problems']}", flush=True)
    for row in rows:
        row.setdefault("tail", "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    bench_common.write_csv(rows, args.out)
    correct = sum(row["correct"] for row in rows)
    hit = sum(1 for row in rows if row["lost"])
    print(f"{correct} of {len(rows)} runs finished correctly ({hit} lost a rank; the others "
          f"were killed after the end)")
    return 0 if correct == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
