"""One rank of the PyTorch DistributedDataParallel (gloo) side of ``scripts/bench-ddp``.

Launched by ``mpirun -n P`` (rank and size from Open MPI's environment; torch talks over
its own gloo TCP rendezvous, MPI is not used). It trains exactly what ``granger-mpi train``
trains in the same benchmark, so that only the framework differs:

- the same initial parameters (``granger_mpi.model.models.Model.init_params(seed)``),
- the same rows per rank and step (``granger_mpi.data.partition.EpochPlan``: the same
  permutation per epoch, the same contiguous piece of each global batch per rank),
- the same loss: the global batch's mean cross-entropy (each rank's sum scaled by
  P / batch, which DDP's averaging over P turns into sum / batch, as granger-mpi does),
- SGD with momentum and weight decay, PyTorch's convention (granger-mpi uses it too),
- the same threads per rank (one share of the cores, as ``granger-mpi`` sets).

The data is read into memory before the clock starts (granger-mpi reads it inside its
timed loop: the whole file at once when it fits its memory budget, else per step), which
favours DDP. Rank 0 prints one line ``RESULT {json}``.
"""

import argparse
import datetime
import json
import os
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset")
    parser.add_argument("test_dataset")
    parser.add_argument("--hidden", default="128,64")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--address", default="127.0.0.1", help="rank 0's address for the rendezvous")
    parser.add_argument("--timeout", type=float, default=120.0, help="rendezvous timeout, seconds")
    parser.add_argument("--hook", choices=("none", "fp16", "bf16"), default="none",
                        help="DDP communication hook: compress the gradient buckets")
    parser.add_argument("--threads", type=int, required=True)
    args = parser.parse_args()

    rank = int(os.environ["OMPI_COMM_WORLD_RANK"])
    size = int(os.environ["OMPI_COMM_WORLD_SIZE"])
    import h5py
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from granger_mpi.data import dataset, partition
    from granger_mpi.model import models
    from granger_mpi.tools import rendezvous

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    rendezvous.use_interface_for_gloo(args.address)
    dist.init_process_group("gloo", init_method=f"tcp://{args.address}:{args.port}",
                            rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=args.timeout))
    with h5py.File(args.dataset, "r") as f:
        X = torch.from_numpy(np.ascontiguousarray(f["X"][...], np.float32))
        y = torch.from_numpy(np.ascontiguousarray(f["y"][...], np.int64))
    n_rows, n_features = X.shape
    window = dataset.open_info(args.dataset).window     # the same lanes and windows as ours
    n_classes = int(y.max()) + 1
    hidden = [int(h) for h in args.hidden.split(",")]
    spec = models.build("mlp", hidden, "relu", n_features, "classification", n_classes)
    flat = spec.init_params(args.seed)
    views = spec.layout.views(flat)

    layers = []
    sizes = spec.sizes
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        linear = torch.nn.Linear(d_in, d_out)
        with torch.no_grad():   # granger-mpi computes X @ W + b with W of shape (in, out)
            linear.weight.copy_(torch.from_numpy(views[f"W{i}"].T.copy()))
            linear.bias.copy_(torch.from_numpy(views[f"b{i}"].copy()))
        layers.append(linear)
        if i < len(sizes) - 1:
            layers.append(torch.nn.ReLU())
    model = DistributedDataParallel(torch.nn.Sequential(*layers))
    if args.hook != "none":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
        model.register_comm_hook(None, {"fp16": default_hooks.fp16_compress_hook,
                                        "bf16": default_hooks.bf16_compress_hook}[args.hook])
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")

    dist.barrier()
    started = time.perf_counter()
    steps = 0
    for epoch in range(args.epochs):
        plan = partition.EpochPlan.make(n_rows, args.batch, args.seed, epoch, window=window,
                                        world_size=size, rank=rank)
        for step in range(plan.steps):
            batch_len = plan.batch_len(step)
            rows = torch.from_numpy(plan.rows(step))
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(X[rows]), y[rows]) * (size / batch_len)
            loss.backward()
            optimizer.step()
            steps += 1
    dist.barrier()
    seconds = time.perf_counter() - started

    if rank == 0:
        with h5py.File(args.test_dataset, "r") as f:
            X_test = torch.from_numpy(np.ascontiguousarray(f["X"][...], np.float32))
            y_test = torch.from_numpy(np.ascontiguousarray(f["y"][...], np.int64))
        with torch.no_grad():
            accuracy = float((model.module(X_test).argmax(1) == y_test).float().mean())
        print("RESULT " + json.dumps({"steps": steps, "seconds": seconds,
                                      "samples": n_rows * args.epochs, "test_accuracy": accuracy,
                                      "threads": torch.get_num_threads(),
                                      "torch": torch.__version__}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
