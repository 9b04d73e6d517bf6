"""Does cutting a message into segments help on a link? Run under mpirun at P = 2 across hosts.

  scripts/cluster up --hosts 2 --slots 1 --rate 1gbit
  scripts/cluster run -n 2 -- .venv/bin/python scripts/bench_segments.py --reps 5

For each message size, side by side, rounds alternating:

- ``ring, pieces K``: the ring allreduce with its segments sent in pieces of K bytes, all
  posted at once (``collectives.buffers.PIPELINE_ELEMENTS``, whose default sends them whole);
- ``sendrecv, pieces K``: the same bytes each way between the two ranks, as one
  ``Sendrecv`` (K = 0) or as consecutive ``Sendrecv``s of K bytes.

Times are the slowest rank's median per call, as a multiple of the link's bound
``2(P-1)/P * bytes / rate``. Writes OUT/segments{TAG}.csv and .png.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common  # noqa: E402
from granger_mpi.collectives import buffers, ring  # noqa: E402

MIB = 1 << 20
DEFAULT_PIECES = buffers.PIPELINE_ELEMENTS


def sendrecv_pieces(comm, src, dst, piece_bytes):
    """Exchange ``src`` with the other rank, whole or in consecutive pieces."""
    other = 1 - comm.Get_rank()
    step = src.size if piece_bytes == 0 else piece_bytes // 4
    for lo in range(0, src.size, step):
        comm.Sendrecv(src[lo:lo + step], other, 1, dst[lo:lo + step], other, 1)


def ring_pieces(comm, buf, piece_bytes):
    """The ring allreduce with segments sent in pieces of ``piece_bytes`` (0: whole)."""
    buffers.PIPELINE_ELEMENTS = (piece_bytes // 4) if piece_bytes else 1 << 40
    try:
        ring.allreduce(comm, buf)
    finally:
        buffers.PIPELINE_ELEMENTS = DEFAULT_PIECES


def median_seconds(comm, fn, calls):
    times = []
    for _ in range(calls):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return comm.allreduce(statistics.median(times), op=MPI.MAX)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes-mib", default="1,2,4,8", help="message sizes in MiB (default 1,2,4,8)")
    p.add_argument("--pieces-kib", default="0,1024,256", help="piece sizes in KiB, 0 = whole (default 0,1024,256)")
    p.add_argument("--reps", type=int, default=5, help="rounds; each times every side (default 5)")
    p.add_argument("--calls", type=int, default=5, help="timed calls per side and round (default 5)")
    p.add_argument("--rate-bits", type=float, default=1e9, help="the link's rate (default 1e9)")
    p.add_argument("--out", type=Path, default=bench_common.ROOT / "docs" / "bench")
    p.add_argument("--tag", default="_2hosts_1gbit")
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    if comm.Get_size() != 2:
        sys.exit("bench_segments: run it on exactly 2 ranks")
    sizes = [int(s) * MIB for s in args.sizes_mib.split(",")]
    pieces = [int(k) * 1024 for k in args.pieces_kib.split(",")]
    buf = np.zeros(max(sizes) // 4, np.float32)
    src, dst = np.zeros_like(buf), np.empty_like(buf)
    sides = {}
    for nbytes in sizes:
        for k in pieces:
            if k < nbytes:
                sides[("ring", nbytes, k)] = lambda n=nbytes, k=k: ring_pieces(comm, buf[:n // 4], k)
                sides[("sendrecv", nbytes, k)] = lambda n=nbytes, k=k: sendrecv_pieces(comm, src[:n // 4], dst[:n // 4], k)
    for fn in sides.values():
        fn()
    samples = {key: [] for key in sides}
    for rep in range(args.reps):
        for key, fn in (sides.items() if rep % 2 == 0 else reversed(sides.items())):
            samples[key].append(median_seconds(comm, fn, args.calls))
    if comm.Get_rank() == 0:
        rows = []
        for (impl, nbytes, k), values in samples.items():
            bound = nbytes * 8 / args.rate_bits      # 2(P-1)/P = 1 at P = 2
            rows.append({"impl": impl, "bytes": nbytes, "piece_bytes": k, "median_us": statistics.median(values) * 1e6,
                         "min_us": min(values) * 1e6, "max_us": max(values) * 1e6,
                         "over_bound": statistics.median(values) / bound})
        bench_common.write_csv(rows, args.out / f"segments{args.tag}.csv")
        print(f"{'size':>6} {'side':<10} " + " ".join(f"{'whole' if k == 0 else f'{k >> 10} KiB':>16}" for k in pieces))
        for nbytes in sizes:
            for impl in ("ring", "sendrecv"):
                cells = []
                for k in pieces:
                    row = next((r for r in rows if (r["impl"], r["bytes"], r["piece_bytes"]) == (impl, nbytes, k)), None)
                    cells.append(f"{row['over_bound']:.2f}x [{row['min_us'] / row['median_us'] * row['over_bound']:.2f}-"
                                 f"{row['max_us'] / row['median_us'] * row['over_bound']:.2f}]" if row else "-")
                print(f"{nbytes >> 20:>4} MiB {impl:<10} " + " ".join(f"{c:>16}" for c in cells))
        plot(rows, sizes, pieces, args.out / f"segments{args.tag}.png")
        print(f"wrote {args.out / f'segments{args.tag}.csv'} and .png")


def plot(rows, sizes, pieces, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, impl in zip(axes, ("ring", "sendrecv")):
        for k in pieces:
            mine = [r for r in rows if r["impl"] == impl and r["piece_bytes"] == k]
            ax.plot([r["bytes"] >> 20 for r in mine], [r["over_bound"] for r in mine], marker="o",
                    label="whole" if k == 0 else f"pieces of {k >> 10} KiB")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message (MiB)")
        ax.set_title(impl)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("median time / link bound")
    axes[0].legend(fontsize=8)
    fig.suptitle("segments on a shaped 1 Gbit/s link, P = 2")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
