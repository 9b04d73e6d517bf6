"""``granger-mpi bench``: allreduce micro-benchmarks in the style of the OSU benchmarks.

Every algorithm (and, if PyTorch is importable, ``torch.distributed`` on gloo) is timed
side by side in one job: for each size, rounds alternate the algorithms so that machine
noise hits them alike. Each call is timed between barriers, as the slowest rank saw it;
we report min/median/max over calls, algorithm bandwidth ``n / t`` and bus bandwidth
``busbw = algbw * 2(P-1)/P`` (as nccl-tests do).
"""

import csv
import json
import socket
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from granger_mpi import checkpoint, collectives
from granger_mpi.collectives import auto, shm
from granger_mpi.errors import UserError
from granger_mpi.model.models import Model
from granger_mpi.mpi.runtime import raise_from_root
from granger_mpi.tools import rendezvous

HAND_WRITTEN = ("ring", "rhd", "rd", "shm", "hierarchical")


def sizes_between(smallest, largest):
    """Powers of two from ``smallest`` to ``largest`` bytes (at least 4)."""
    sizes, n = [], max(4, smallest)
    while n <= largest:
        sizes.append(n)
        n *= 2
    return sizes


def calls_for(nbytes, budget_bytes=256 << 20, fewest=5, most=400):
    """How many timed calls a size gets: many for small messages, few for large."""
    return int(min(most, max(fewest, budget_bytes // max(nbytes, 1) // 8)))


class TorchGloo:
    """``torch.distributed.all_reduce`` on gloo in the same job, for comparison; its
    rendezvous at rank 0's address (``rendezvous.address``), given up after ``timeout_s``."""

    def __init__(self, comm, timeout_s=60.0):
        import datetime
        import torch
        import torch.distributed as dist
        where = rendezvous.address(comm)
        rendezvous.use_interface_for_gloo(where)
        try:
            dist.init_process_group("gloo", init_method=f"tcp://{where}", rank=comm.Get_rank(),
                                    world_size=comm.Get_size(),
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except (RuntimeError, OSError) as exc:     # torch's store errors derive from RuntimeError
            raise UserError(f"--torch: gloo could not connect rank {comm.Get_rank()} to tcp://{where} "
                            f"within {timeout_s:g} s ({str(exc).splitlines()[0][:200]}); set "
                            f"MASTER_ADDR to an address of rank 0's host that every rank reaches")
        self.torch, self.dist = torch, dist

    def allreduce(self, buf):
        self.dist.all_reduce(self.torch.from_numpy(buf))

    def close(self):
        self.dist.destroy_process_group()


def time_calls(comm, fn, buf, calls):
    """Per-call seconds as the slowest rank saw them (collective)."""
    times = np.empty(calls)
    for i in range(calls):
        comm.Barrier()
        t0 = time.perf_counter()
        fn(buf)
        times[i] = time.perf_counter() - t0
    comm.Allreduce(MPI.IN_PLACE, times, op=MPI.MAX)
    return times


def run_allreduce(comm, *, algorithms, sizes, rounds=3, torch=False, ranks_per_node=None,
                  warmup=2, torch_timeout_s=60.0):
    """Rows ``{impl, bytes, calls, min_us, median_us, max_us, algbw_GBps, busbw_GBps}``."""
    size = comm.Get_size()
    impls = {}
    for name in algorithms:
        impls[name] = (lambda b, a=name: collectives.allreduce(comm, b, algorithm=a,
                                                               ranks_per_node=ranks_per_node))
    gloo = TorchGloo(comm, torch_timeout_s) if torch else None
    if gloo is not None:
        impls["torch-gloo"] = gloo.allreduce
    rows = []
    # One buffer from collectives.allocate (shared memory on one node), as training uses;
    # each size is a prefix of it. Zeros: repeated sums never overflow.
    whole = collectives.allocate(comm, max(sizes) // 4, np.float32)
    for nbytes in sizes:
        buf = whole[:nbytes // 4]
        calls = calls_for(nbytes)
        per_round = max(1, calls // rounds)
        samples = {name: [] for name in impls}
        for name, fn in impls.items():
            time_calls(comm, fn, buf, warmup)
        for _ in range(rounds):
            for name, fn in impls.items():
                samples[name].append(time_calls(comm, fn, buf, per_round))
        for name, chunks in samples.items():
            t = np.concatenate(chunks)
            median = float(np.median(t))
            algbw = nbytes / median / 1e9
            rows.append({"impl": name, "ranks": size, "bytes": nbytes, "calls": t.size,
                         "min_us": t.min() * 1e6, "median_us": median * 1e6, "max_us": t.max() * 1e6,
                         "algbw_GBps": algbw, "busbw_GBps": algbw * 2 * (size - 1) / size})
    if gloo is not None:
        gloo.close()
    return rows


def write_csv(rows, path):
    """Write benchmark rows as CSV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def format_size(nbytes):
    """``4 B``, ``16 KiB``, ``64 MiB``."""
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def bandwidth_bound_us(nbytes, ranks, bits_per_s):
    """The least time any allreduce can take on links of ``bits_per_s``: 2(P-1)/P n / rate."""
    return 2 * (ranks - 1) / ranks * nbytes * 8 / bits_per_s * 1e6


def table(rows, link_bits_per_s=None):
    """Median microseconds per size and implementation, and each one's speed-up over native.

    With ``link_bits_per_s``, also the bandwidth bound and how far the best is above it.
    """
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    sizes = list(dict.fromkeys(r["bytes"] for r in rows))
    by = {(r["impl"], r["bytes"]): r for r in rows}
    head = f"{'size':>8} " + " ".join(f"{i:>12}" for i in impls) + "   best hand-written vs native"
    if link_bits_per_s:
        head += "   bound us  best/bound"
    lines = [head]
    for n in sizes:
        cells = " ".join(f"{by[(i, n)]['median_us']:>12.1f}" for i in impls)
        hand = [i for i in impls if i in HAND_WRITTEN]
        note = ""
        if hand and "native" in impls:
            best = min(hand, key=lambda i: by[(i, n)]["median_us"])
            note = f"   {best} {by[('native', n)]['median_us'] / by[(best, n)]['median_us']:.2f}x"
            if link_bits_per_s:
                bound = bandwidth_bound_us(n, rows[0]["ranks"], link_bits_per_s)
                note += f"   {bound:>9.1f}  {by[(best, n)]['median_us'] / bound:>9.2f}"
        lines.append(f"{format_size(n):>8} {cells}{note}")
    return "\n".join(lines)


def plot(rows, path, title):
    """Latency and speed-up over native against size, one line per implementation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    native = {r["bytes"]: r["median_us"] for r in rows if r["impl"] == "native"}
    for impl in impls:
        mine = [r for r in rows if r["impl"] == impl]
        x = [r["bytes"] for r in mine]
        ax1.plot(x, [r["median_us"] for r in mine], marker=".", label=impl)
        if native:
            ax2.plot(x, [native[r["bytes"]] / r["median_us"] for r in mine], marker=".", label=impl)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size (bytes)")
        ax.grid(True, which="both", alpha=0.3)
    ax1.set_yscale("log")
    ax1.set_ylabel("median time per call (us)")
    ax2.set_ylabel("speed-up over native MPI_Allreduce")
    ax2.axhline(1.0, color="black", linewidth=0.8)
    ax1.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main_allreduce(comm, args):
    """The ``bench allreduce`` command."""
    algorithms = args.algorithms.split(",")
    unknown = [a for a in algorithms if a not in collectives.ALGORITHMS]
    if unknown:
        raise UserError(f"--algorithms: unknown {', '.join(unknown)}; known: {', '.join(collectives.ALGORITHMS)}")
    rows = run_allreduce(comm, algorithms=algorithms,
                         sizes=sizes_between(args.min_bytes, args.max_bytes), rounds=args.rounds,
                         torch=args.torch, ranks_per_node=args.ranks_per_node,
                         torch_timeout_s=args.torch_timeout)
    if comm.Get_rank() == 0:
        out = Path(args.out)
        stem = f"allreduce_p{comm.Get_size()}{args.tag}"
        write_csv(rows, out / f"{stem}.csv")
        plot(rows, out / f"{stem}.png", f"allreduce, P = {comm.Get_size()}, float32")
        print(f"allreduce, P = {comm.Get_size()}, median us per call ({args.rounds} rounds)")
        print(table(rows, args.link_rate))
        print(f"wrote {out / (stem + '.csv')} and {out / (stem + '.png')}")
    return 0


def fit_model(comm, rows):
    """Alpha, beta, gamma from the measured rows (recursive doubling) and a local add."""
    size = comm.Get_size()
    steps = max(1.0, np.log2(1 << (size.bit_length() - 1)))
    rd = sorted((r for r in rows if r["impl"] == "rd"), key=lambda r: r["bytes"])
    alpha = rd[0]["median_us"] * 1e-6 / steps
    a = np.ones(1 << 22, np.float32)
    b = np.ones_like(a)
    t0 = time.perf_counter()
    for _ in range(5):
        np.add(a, b, out=a)
    gamma = (time.perf_counter() - t0) / 5 / a.nbytes
    big = rd[-1]
    per_byte = (big["median_us"] * 1e-6 / steps - alpha) / big["bytes"]
    beta = max(per_byte - gamma, gamma)
    return {"alpha": alpha, "beta": beta, "gamma": gamma}


def main_calibrate(comm, args):
    """The ``bench calibrate`` command: measure, then store a table for this world size."""
    algorithms = [a for a in auto.CANDIDATES if a != "shm" or shm.on_one_node(comm)]
    rows = run_allreduce(comm, algorithms=algorithms, sizes=sizes_between(4, args.max_bytes),
                         rounds=args.rounds)
    model = fit_model(comm, rows)
    if comm.Get_rank() == 0:
        path = Path(args.out) if args.out else auto.calibration_path()
        doc = auto.read_calibration(path)
        key = auto.table_key(comm.Get_size(), shm.on_one_node(comm))
        sizes = sorted({r["bytes"] for r in rows})
        doc.setdefault("tables", {})[key] = {
            "bytes": sizes,
            "median_us": {a: [next(r["median_us"] for r in rows if r["impl"] == a and r["bytes"] == n)
                              for n in sizes] for a in algorithms},
            "host": socket.gethostname(), "measured": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        doc["model"] = model
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True))
        tmp.replace(path)
        best = doc["tables"][key]
        print(f"calibrated {key}: alpha {model['alpha'] * 1e6:.1f} us, beta {1 / model['beta'] / 1e9:.2f} GB/s, "
              f"gamma {1 / model['gamma'] / 1e9:.2f} GB/s")
        for i, n in enumerate(sizes):
            fastest = min(algorithms, key=lambda a: best["median_us"][a][i])
            print(f"{format_size(n):>8}: {fastest}")
        print(f"wrote {path}")
    return 0


SMALL_REPS = 31     # the least saves per size under 64 MiB (milliseconds each, the most varied)


def main_checkpoint(comm, args):
    """The ``bench checkpoint`` command: save bandwidth against ``dd ... conv=fsync``."""
    import shutil
    import subprocess

    rank, size = comm.Get_rank(), comm.Get_size()
    work = Path(args.dir) / f"p{size}"
    if rank == 0:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    comm.Barrier()
    rows = []
    for mib in args.sizes:
        # params + velocity = 8 bytes per parameter: one 1024 x k layer and a tiny output
        k = max(1, (mib << 20) // 8 // 1025)
        model = Model("mlp", (1024, k, 1), "relu", "regression")
        params = np.random.default_rng(0).random(model.layout.size).astype(np.float32)
        state = checkpoint.Snapshot(params, params.copy(), 0, 0, 0)
        nbytes = 2 * params.nbytes
        def save():
            comm.Barrier()
            t0 = time.perf_counter()
            checkpoint.save(comm, work / f"{mib}", model, state, job_json="{}", seed=0, keep_last=1,
                            verify_after_write=not args.no_verify)
            comm.Barrier()
            seconds = time.perf_counter() - t0
            checkpoint.wait_for_pruning()    # its deletions must not slow the dd
            return seconds

        def dd():
            seconds = np.zeros(1)
            if rank == 0:
                target = work / "dd.bin"
                t0 = time.perf_counter()
                subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=4M", f"count={nbytes}",
                                "iflag=count_bytes", "conv=fsync"], check=True, capture_output=True)
                seconds[0] = time.perf_counter() - t0
                target.unlink()
            # The other ranks wait for dd as for rank 0's save, sleeping: spinning in MPI they
            # took the cores from dd (P = 2: dd 6.5-7.8 ms against 4.8-6.4 at P = 1).
            raise_from_root(comm, None)
            comm.Bcast(seconds, root=0)
            return float(seconds[0])
        for rep in range(args.reps if mib >= 64 else max(args.reps, SMALL_REPS)):
            state.step = rep + 1
            # Each goes first in every other rep: what runs just before (busy or waiting)
            # changes how fast a small fsync is here.
            if rep % 2:
                dd_s, ours = dd(), save()
            else:
                ours, dd_s = save(), dd()
            rows.append({"ranks": size, "mib": nbytes / 2**20, "rep": rep, "save_s": ours,
                         "dd_s": dd_s})
        shutil.rmtree(work / f"{mib}", ignore_errors=True) if rank == 0 else None
    if rank == 0:
        write_csv(rows, Path(args.out) / f"checkpoint{'_noverify' if args.no_verify else ''}_p{size}.csv")
        print(f"checkpoint save vs dd conv=fsync, P = {size}, medians of {args.reps} "
              f"(at least {SMALL_REPS} under 64 MiB)"
              f"{', no read-back verification' if args.no_verify else ''}; spread: the middle half "
              f"of the reps' own save/dd (each save and the dd next to it)")
        print(f"{'state':>10} {'save s':>9} {'GB/s':>7} {'dd s':>9} {'GB/s':>7} {'save/dd':>8} "
              f"{'spread':>9}")
        for mib in sorted({r["mib"] for r in rows}):
            mine = [r for r in rows if r["mib"] == mib]
            save_s = float(np.median([r["save_s"] for r in mine]))
            dd_s = float(np.median([r["dd_s"] for r in mine]))
            low, high = np.percentile([r["dd_s"] / r["save_s"] for r in mine], [25, 75])
            gb = mib * 2**20 / 1e9
            print(f"{mib:>7.0f} MiB {save_s:>9.4f} {gb / save_s:>7.2f} {dd_s:>9.4f} {gb / dd_s:>7.2f} "
                  f"{dd_s / save_s:>7.0%} {low:>4.0%}-{high:.0%}")
        shutil.rmtree(work, ignore_errors=True)
    return 0
