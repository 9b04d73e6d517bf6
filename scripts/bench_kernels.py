"""Benchmark: MLP loss+gradient in the Numba kernel vs plain numpy, side by side.

Both sides compute the same thing on the same float32 arrays: forward pass, softmax
cross-entropy, backward pass into one flat gradient buffer. Rounds alternate the two
implementations so that machine noise hits both alike; we report median and
interquartile range per implementation and the ratio of medians.
"""

import argparse
import csv
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="784,256,10", help="layer widths (default 784,256,10)")
    p.add_argument("--batch", type=int, default=256, help="rows per call (default 256)")
    p.add_argument("--reps", type=int, default=60, help="timed calls per implementation")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS threads (default 1: one rank per core, as in training)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "bench", help="CSV/PNG folder")
    return p.parse_args()


def numpy_loss_grad(params, sizes, X, y, scale, grad):
    """The plain-numpy twin of kernels.mlp.cross_entropy_loss_grad (float32 throughout)."""
    import numpy as np
    layers, off = [], 0
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        W = params[off:off + d_in * d_out].reshape(d_in, d_out)
        gW = grad[off:off + d_in * d_out].reshape(d_in, d_out)
        off += d_in * d_out
        layers.append((W, params[off:off + d_out], gW, grad[off:off + d_out]))
        off += d_out
    acts = [X]
    for i, (W, b, _, _) in enumerate(layers):
        Z = acts[-1] @ W
        Z += b
        if i < len(layers) - 1:
            np.maximum(Z, 0, out=Z)
        acts.append(Z)
    out = acts[-1]
    out -= out.max(axis=1, keepdims=True)
    np.exp(out, out=out)
    total = out.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    loss = float(-np.log(out[rows, y] / total[:, 0]).sum())
    out /= total
    out[rows, y] -= 1
    delta = out * np.float32(scale)
    for i in range(len(layers) - 1, -1, -1):
        W, _, gW, gb = layers[i]
        np.dot(acts[i].T, delta, out=gW)
        delta.sum(axis=0, out=gb)
        if i:
            delta = delta @ W.T
            delta *= acts[i] > 0
    return loss


def main():
    args = parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np

    from granger_mpi.kernels import mlp
    from granger_mpi.models import Model

    sizes = tuple(int(s) for s in args.sizes.split(","))
    model = Model("mlp", sizes, "relu", "classification")
    rng = np.random.default_rng(0)
    params = model.init_params(0)
    X = rng.normal(size=(args.batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], args.batch).astype(np.int32)
    sizes_arr = np.array(sizes, np.int64)
    scale = np.float32(1 / args.batch)
    g_numba, g_numpy = np.empty_like(params), np.empty_like(params)

    def run_numba():
        return mlp.cross_entropy_loss_grad(params, sizes_arr, mlp.RELU, X, y, scale, g_numba)[0]

    def run_numpy():
        return numpy_loss_grad(params, sizes, X, y, scale, g_numpy)

    impls = {"numba": run_numba, "numpy": run_numpy}
    for fn in impls.values():   # compile / warm caches
        fn()
    loss_numba, loss_numpy = run_numba(), run_numpy()
    np.testing.assert_allclose(g_numba, g_numpy, rtol=1e-3, atol=1e-6)
    assert abs(loss_numba - loss_numpy) <= 1e-3 * abs(loss_numpy)

    times = {name: [] for name in impls}
    for _ in range(args.reps):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "kernels.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["implementation", "sizes", "batch", "threads", "rep", "seconds"])
        for name, values in times.items():
            for rep, value in enumerate(values):
                w.writerow([name, args.sizes, args.batch, args.threads, rep, f"{value:.9f}"])
    stats = {}
    print(f"MLP {args.sizes} batch {args.batch}, {args.threads} BLAS thread(s), {args.reps} reps each")
    print(f"{'impl':<8}{'median ms':>11}{'p25 ms':>9}{'p75 ms':>9}{'GFLOP/s':>9}")
    flops = 6 * args.batch * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    for name, values in times.items():
        p25, med, p75 = np.percentile(values, [25, 50, 75])
        stats[name] = med
        print(f"{name:<8}{med * 1e3:>11.3f}{p25 * 1e3:>9.3f}{p75 * 1e3:>9.3f}{flops / med / 1e9:>9.2f}")
    print(f"ratio numpy/numba (median): {stats['numpy'] / stats['numba']:.2f}x")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ax.boxplot([np.array(times[n]) * 1e3 for n in impls], tick_labels=list(impls))
        ax.set_ylabel("ms per loss+gradient call")
        ax.set_title(f"MLP {args.sizes}, batch {args.batch}, {args.threads} thread(s)")
        fig.tight_layout()
        fig.savefig(args.out / "kernels.png", dpi=110)
        print(f"wrote {csv_path} and {args.out / 'kernels.png'}")
    except ImportError:
        print(f"wrote {csv_path} (matplotlib missing: no plot)", file=sys.stderr)


if __name__ == "__main__":
    main()
