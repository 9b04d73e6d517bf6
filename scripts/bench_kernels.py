"""Benchmark: MLP loss+gradient in the Numba kernel vs plain numpy (and PyTorch), side by side.

All sides compute the same thing on the same float32 arrays: forward pass, softmax
cross-entropy, backward pass into the parameters' gradients. Rounds alternate the
implementations so that machine noise hits all alike; we report median and interquartile
range per implementation and batch, and the ratios of medians. PyTorch (``--torch``) is
the CPU build from the benchmark environment (``pip install --target .bench-site
torch==2.13.0``; run with ``PYTHONPATH=.bench-site``), autograd on ``nn.Linear`` layers,
with the same number of threads.
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
    p.add_argument("--batch", default="256", help="rows per call, comma-separated for several (default 256)")
    p.add_argument("--torch", action="store_true", help="also time PyTorch (needs it on PYTHONPATH)")
    p.add_argument("--reps", type=int, default=60, help="timed calls per implementation")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS threads (default 1: one rank per core, as in training)")
    p.add_argument("--processes", type=int, default=1,
                   help="time while this many processes in all run the numba kernel at the same "
                        "batch and threads, as ranks sharing a node do (default 1: alone)")
    p.add_argument("--burn", action="store_true", help=argparse.SUPPRESS)   # a --processes companion
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


def torch_loss_grad_factory(params, sizes, X, y, threads):
    """PyTorch's forward+backward of the same network (weights copied from ``params``)."""
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    layers, off = [], 0
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        linear = torch.nn.Linear(d_in, d_out)
        with torch.no_grad():
            linear.weight.copy_(torch.from_numpy(params[off:off + d_in * d_out].reshape(d_in, d_out).T.copy()))
            off += d_in * d_out
            linear.bias.copy_(torch.from_numpy(params[off:off + d_out].copy()))
            off += d_out
        layers += [linear, torch.nn.ReLU()]
    net = torch.nn.Sequential(*layers[:-1])
    X_t, y_t = torch.from_numpy(X), torch.from_numpy(y.astype(np.int64))

    def run():
        for q in net.parameters():
            q.grad = None
        loss = torch.nn.functional.cross_entropy(net(X_t), y_t, reduction="sum")
        loss.backward()
        return float(loss.detach())

    def flat_grad():
        parts = []
        for layer in net:
            if isinstance(layer, torch.nn.Linear):
                parts += [layer.weight.grad.T.numpy().ravel(), layer.bias.grad.numpy()]
        return np.concatenate(parts)
    return run, flat_grad, torch.__version__


def companions(args, batch):
    """``--processes - 1`` processes computing the numba kernel at ``batch`` until stopped."""
    import subprocess
    return [subprocess.Popen([sys.executable, __file__, "--sizes", args.sizes, "--batch", str(batch),
                              "--threads", str(args.threads), "--burn"]) for _ in range(args.processes - 1)]


def burn(sizes, batch):
    """Compute the kernel in a loop (a companion of ``--processes``), until killed."""
    import numpy as np

    from granger_mpi.kernels import mlp
    from granger_mpi.model.models import Model
    params = Model("mlp", sizes, "relu", "classification").init_params(0)
    rng = np.random.default_rng(1)
    X = rng.normal(size=(batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[-1], batch).astype(np.int32)
    grad = np.empty_like(params)
    while True:
        mlp.cross_entropy_loss_grad(params, np.array(sizes, np.int64), mlp.RELU, X, y, np.float32(1), grad)


def main():
    args = parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    if args.burn:
        return burn(tuple(int(s) for s in args.sizes.split(",")), int(args.batch))
    import numpy as np

    from granger_mpi.kernels import mlp
    from granger_mpi.model.models import Model

    sizes = tuple(int(s) for s in args.sizes.split(","))
    batches = [int(b) for b in args.batch.split(",")]
    model = Model("mlp", sizes, "relu", "classification")
    sizes_arr = np.array(sizes, np.int64)
    flops_per_row = 6 * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    rows, medians = [], {}
    versions = f"numpy {np.__version__}"
    for batch in batches:
        rng = np.random.default_rng(0)
        params = model.init_params(0)
        X = rng.normal(size=(batch, sizes[0])).astype(np.float32)
        y = rng.integers(0, sizes[-1], batch).astype(np.int32)
        scale = np.float32(1.0)   # summed loss, as the torch twin's reduction="sum"
        g_numba, g_numpy = np.empty_like(params), np.empty_like(params)
        impls = {
            "numba": lambda: mlp.cross_entropy_loss_grad(params, sizes_arr, mlp.RELU, X, y, scale, g_numba)[0],
            "numpy": lambda: numpy_loss_grad(params, sizes, X, y, scale, g_numpy),
        }
        if args.torch:
            run_torch, torch_grad, torch_version = torch_loss_grad_factory(params, sizes, X, y, args.threads)
            impls["torch"] = run_torch
            versions = f"numpy {np.__version__}, torch {torch_version}"
        others = companions(args, batch)
        for fn in impls.values():   # compile / warm caches
            fn()
        time.sleep(2.0 if others else 0.0)    # the companions compile and start computing
        losses = {name: fn() for name, fn in impls.items()}
        np.testing.assert_allclose(g_numba, g_numpy, rtol=1e-3, atol=1e-4)
        if args.torch:
            np.testing.assert_allclose(g_numba, torch_grad(), rtol=1e-3, atol=1e-4)
        for name, value in losses.items():
            assert abs(value - losses["numba"]) <= 1e-3 * abs(losses["numba"]), losses
        times = {name: [] for name in impls}
        for _ in range(args.reps):
            for name, fn in impls.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        for other in others:
            other.kill()
            other.wait()
        print(f"MLP {args.sizes} batch {batch}, {args.threads} thread(s), {args.processes} process(es) "
              f"computing, {args.reps} reps each ({versions})")
        print(f"{'impl':<8}{'median ms':>11}{'p25 ms':>9}{'p75 ms':>9}{'GFLOP/s':>9}")
        for name, values in times.items():
            p25, med, p75 = np.percentile(values, [25, 50, 75])
            medians[(name, batch)] = med
            print(f"{name:<8}{med * 1e3:>11.3f}{p25 * 1e3:>9.3f}{p75 * 1e3:>9.3f}"
                  f"{flops_per_row * batch / med / 1e9:>9.2f}")
            rows += [[name, args.sizes, batch, args.threads, args.processes, rep, f"{v:.9f}"]
                     for rep, v in enumerate(values)]
        ratios = [f"numpy/numba {medians[('numpy', batch)] / medians[('numba', batch)]:.2f}x"]
        if args.torch:
            ratios.append(f"torch/numba {medians[('torch', batch)] / medians[('numba', batch)]:.2f}x")
        print("ratio of medians: " + ", ".join(ratios) + "\n")

    args.out.mkdir(parents=True, exist_ok=True)
    csv_path = args.out / "kernels.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["implementation", "sizes", "batch", "threads", "processes", "rep", "seconds"])
        w.writerows(rows)
    names = sorted({name for name, _ in medians}, key=["numba", "numpy", "torch"].index)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ax.bar([b + (i - (len(names) - 1) / 2) * width for b in range(len(batches))],
                   [flops_per_row * batch / medians[(name, batch)] / 1e9 for batch in batches],
                   width, label=name)
        ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
        ax.set_ylabel("GFLOP/s (median)")
        ax.set_title(f"MLP {args.sizes} loss+gradient, {args.threads} thread(s)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "kernels.png", dpi=110)
        print(f"wrote {csv_path} and {args.out / 'kernels.png'}")
    except ImportError:
        print(f"wrote {csv_path} (matplotlib missing: no plot)", file=sys.stderr)


if __name__ == "__main__":
    main()
