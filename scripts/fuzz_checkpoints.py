"""The checkpoint and model-file corruption fuzzer of ``tests/test_corruption.py``, for
long runs: trains a small job (2 ranks), then mutates its newest checkpoint and its model
file ``--count`` times, sealed and unsealed, and prints the tally. Exit 1 when a harmful
mutation was accepted by any reader, or a reader crashed or hung in HDF5 on a sealed file.

    .venv/bin/python scripts/fuzz_checkpoints.py [--count 5000] [--seed 1] [--work DIR]
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import mpirun, write_job  # noqa: E402
from corruption import fuzz  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fuzz-checkpoints-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data.h5"
    made = mpirun(2, "make-dataset", data, "--rows", "2000", "--test-rows", "500", "--features", "12",
                  "--classes", "4", "--seed", "5")
    if made.returncode != 0:
        sys.exit(made.output)
    job = write_job(work / "job.toml", dataset=data, run_dir=work / "source",
                    train={"max_steps": 20}, checkpoint={"every_steps": 10})
    trained = mpirun(2, "train", job, "--overwrite", timeout=300)
    if trained.returncode != 0:
        sys.exit(trained.output)
    started = time.monotonic()

    def progress(n, tally):
        if n % 250 == 0 or n == args.count:
            print(f"[{time.monotonic() - started:7.1f} s] {n}/{args.count}: {tally}", flush=True)
    tally = fuzz(work / "source", args.count, args.seed, work, progress=progress)
    print(f"seed {args.seed}: {tally} in {time.monotonic() - started:.0f} s")
    print("by mutation:", ", ".join(f"{k} {v}" for k, v in sorted(tally.kinds.items())))
    for label, reader in tally.accepted:
        print(f"ACCEPTED  {label}  by {reader}")
    for label, how, copy in tally.crashed:
        print(f"HDF5 {how:<18} {label}  (kept: {copy})")
    sealed_crashes = [c for c in tally.crashed if not c[0].startswith("unsealed")]
    return 1 if tally.accepted or sealed_crashes else 0


if __name__ == "__main__":
    sys.exit(main())
