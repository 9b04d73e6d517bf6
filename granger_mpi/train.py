"""The training loop (DESIGN.md §3): read rows, loss+gradient, allreduce, update.

One fused message per step: the exchange buffer holds the gradient followed by three
statistics (loss, correct predictions, a bad-data flag), so a step costs exactly one
allreduce and every rank sees the same numbers.
"""

import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from mpi4py import MPI

from granger_mpi import collectives, dataset, metrics, modelfile, models, partition
from granger_mpi.errors import UserError
from granger_mpi.kernels import checks, optim
from granger_mpi.runtime import agree, say

N_STATS = 3  # loss sum / batch, correct / batch, rows with bad data


@dataclass
class TrainResult:
    """What a finished run reports."""

    steps: int
    final_loss: float
    final_accuracy: float | None
    model_path: Path
    metrics_path: Path
    test_loss: float | None = None
    test_accuracy: float | None = None
    seconds: float = 0.0


def prepare(comm, job, overwrite=False):
    """Check everything a run needs, on every rank, before anything is written.

    Collective over ``comm``; raises the same ``UserError`` on all ranks.
    """
    def check():
        info = dataset.open_info(job.data.path)
        if job.data.test_path is not None:
            test = dataset.open_info(job.data.test_path)
            if (test.n_features, test.task, test.n_outputs) != (info.n_features, info.task, info.n_outputs):
                raise UserError(f"[data].test_path {test.path} does not match the training set "
                                f"({test.n_features} features, {test.task}) vs "
                                f"({info.n_features} features, {info.task})")
        try:
            model = models.build(job.model.kind, job.model.hidden, job.model.activation,
                                 info.n_features, info.task, info.n_outputs)
        except ValueError as exc:
            raise UserError(f"[model]: {exc} ({info.path} is {info.task})") from None
        if job.train.global_batch < comm.Get_size():
            raise UserError(f"[train].global_batch = {job.train.global_batch} is smaller than the "
                            f"{comm.Get_size()} ranks; every rank needs at least one row per step")
        run_dir = job.output.run_dir
        taken = [p.name for p in (run_dir / "model.h5", run_dir / "metrics.h5") if p.exists()]
        if taken and not overwrite:
            raise UserError(f"[output].run_dir {run_dir} already holds a run ({', '.join(taken)}); "
                            f"choose another run_dir or pass --overwrite")
        return info, model
    return agree(comm, check)


def warm_kernels(comm, model, info):
    """Compile (or load from cache) the kernels on rank 0 first, then the rest.

    Numba's on-disk cache is not safe against many processes compiling at once.
    """
    def touch():
        X = np.zeros((1, info.n_features), np.float32)
        y = np.zeros(1, np.int32) if info.task == "classification" else np.zeros((1, info.n_targets), np.float32)
        params = model.init_params(0)
        grad = np.empty_like(params)
        model.loss_grad(params, X, y, np.float32(1.0), grad)
        _first_bad_row(info, X, y)
        optim.sgd_momentum(params, grad, np.zeros_like(params), np.float32(0), np.float32(0), np.float32(0))
    if comm.Get_rank() == 0:
        touch()
    comm.Barrier()
    if comm.Get_rank() != 0:
        touch()


def _first_bad_row(info, X, y):
    if info.task == "classification":
        return checks.first_bad_row_classification(X, y, info.n_classes)
    return checks.first_bad_row_regression(X, y)


def train(comm, job, info, model, *, log=print):
    """Run the job on ``comm``; rank 0 writes ``model.h5`` and ``metrics.h5``.

    Collective over ``comm``. Parameters stay bitwise identical on every rank (checked at
    the end); the same job at the same world size gives bitwise identical results.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    run_dir = job.output.run_dir
    warm_kernels(comm, model, info)
    params = model.init_params(job.train.seed)
    velocity = np.zeros_like(params)
    n_params = params.size
    exchange = collectives.allocate(comm, n_params + N_STATS, np.float32)
    grad, stats = exchange[:n_params], exchange[n_params:]
    lr = np.float32(job.optimizer.learning_rate)
    momentum = np.float32(job.optimizer.momentum)
    weight_decay = np.float32(job.optimizer.weight_decay)
    algorithm = job.collectives.algorithm

    per_epoch = partition.steps_per_epoch(info.n_rows, job.train.global_batch)
    total_steps = per_epoch * job.train.epochs
    if job.train.max_steps is not None:
        total_steps = min(total_steps, job.train.max_steps)
    classification = info.task == "classification"

    metrics_file = progress = None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "job.toml").write_text(job.text)
        metrics_file = metrics.MetricsFile(run_dir / "metrics.h5", job.output.metrics_flush_steps,
                                           {"job": job.to_json(), "world_size": size})
        progress = metrics.Progress(total_steps, job.output.progress_interval_s)
        log(f"training {model.kind} {list(model.sizes)} ({n_params:,} parameters) on "
            f"{info.path} ({info.n_rows:,} rows, {info.task}) with {size} rank(s), "
            f"global batch {job.train.global_batch}, {total_steps} steps, allreduce {algorithm}")

    started = time.perf_counter()
    loss = accuracy = float("nan")
    step_index = -1
    stream = dataset.BatchStream(info, job.train.global_batch, job.train.seed, size, rank,
                                 epochs=job.train.epochs, max_steps=job.train.max_steps,
                                 prefetch_steps=job.data.prefetch_steps,
                                 memory_budget_bytes=int(job.data.memory_budget_mb * 2**20))
    try:
        for step_index, (epoch, step, batch_len, rows, X, y) in enumerate(stream):
            t0 = time.perf_counter()
            bad = _first_bad_row(info, X, y) if rows.size else -1
            if bad >= 0:
                exchange[:] = 0
                stats[2] = 1
            else:
                scale = np.float32(1.0 / batch_len)
                if rows.size:
                    loss_sum, correct = model.loss_grad(params, X, y, scale, grad)
                else:
                    grad[:] = 0
                    loss_sum, correct = 0.0, 0
                stats[0] = loss_sum / batch_len
                stats[1] = correct / batch_len
                stats[2] = 0
            collectives.allreduce(comm, exchange, algorithm=algorithm,
                                  ranks_per_node=job.collectives.ranks_per_node)
            if stats[2] > 0:
                _report_bad_row(comm, info, rows[bad] if bad >= 0 else None, epoch, step)
            optim.sgd_momentum(params, grad, velocity, lr, momentum, weight_decay)
            loss = float(stats[0])
            accuracy = float(stats[1]) if classification else None
            if rank == 0:
                step_time = time.perf_counter() - t0
                metrics_file.append(step=step_index, epoch=epoch, loss=loss,
                                    accuracy=np.nan if accuracy is None else accuracy,
                                    grad_norm=float(np.sqrt(optim.sum_of_squares(grad))),
                                    learning_rate=float(lr), step_time_s=step_time,
                                    samples_per_s=batch_len / max(step_time, 1e-12))
                progress.update(step_index, epoch, job.train.epochs, loss, accuracy, batch_len,
                                force=step_index + 1 == total_steps)
    finally:
        stream.close()
        if metrics_file is not None:
            metrics_file.close()

    check_replicas_identical(comm, params, "parameters at the end of training")
    seconds = time.perf_counter() - started
    model_path = run_dir / "model.h5"
    if rank == 0:
        modelfile.save(model_path, model, params,
                       attrs={"job": job.to_json(), "step": step_index + 1, "world_size": size})
    result = TrainResult(step_index + 1, loss, accuracy, model_path, run_dir / "metrics.h5",
                         seconds=seconds)
    if job.data.test_path is not None:
        test_info = dataset.open_info(job.data.test_path)
        result.test_loss, result.test_accuracy = evaluate(comm, model, params, test_info)
    comm.Barrier()
    return result


def _report_bad_row(comm, info, local_row, epoch, step):
    """Agree on the first bad row any rank saw and raise the same error everywhere."""
    row = np.array([np.iinfo(np.int64).max if local_row is None else local_row], np.int64)
    comm.Allreduce(MPI.IN_PLACE, row, op=MPI.MIN)
    what = "a label outside [0, %d)" % info.n_classes if info.task == "classification" else "a NaN/Inf target"
    raise UserError(f"{info.path}: row {int(row[0])} has a NaN/Inf feature in /X or {what} "
                    f"in /y (found at epoch {epoch}, step {step}); nothing was saved", agreed=True)


def check_replicas_identical(comm, params, what):
    """Raise if ``params`` differ between ranks (CRC32 of the bytes, gathered)."""
    crc = np.array([zlib.crc32(params.view(np.uint8))], np.int64)
    crcs = np.empty(comm.Get_size(), np.int64)
    comm.Allgather(crc, crcs)
    if np.unique(crcs).size != 1:
        odd = [r for r in range(comm.Get_size()) if crcs[r] != crcs[0]]
        raise RuntimeError(f"{what} differ between ranks (rank 0 vs ranks {odd}): "
                           f"the replicas diverged, which must never happen")


def evaluate(comm, model, params, info, chunk_rows=65536):
    """Mean loss and accuracy (None for regression) of ``params`` on a whole dataset.

    Collective over ``comm``: each rank reads a contiguous share of the rows in chunks.
    """
    lo, hi = partition.rank_bounds(info.n_rows, comm.Get_size(), comm.Get_rank())
    totals = np.zeros(3, np.float64)  # loss sum, correct, bad rows
    grad = np.empty(model.layout.size, np.float32)
    with h5py.File(info.path, "r") as f:
        for start in range(lo, hi, chunk_rows):
            stop = min(hi, start + chunk_rows)
            X = np.ascontiguousarray(f["X"][start:stop], np.float32)
            if info.task == "classification":
                y = np.ascontiguousarray(f["y"][start:stop], np.int32)
            else:
                y = np.ascontiguousarray(f["y"][start:stop], np.float32).reshape(stop - start, -1)
            bad = _first_bad_row(info, X, y)
            if bad >= 0:
                totals[2] += 1
                continue
            loss_sum, correct = model.loss_grad(params, X, y, np.float32(0), grad)
            totals[0] += loss_sum
            totals[1] += correct
    comm.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)
    if totals[2]:
        raise UserError(f"{info.path}: rows with NaN/Inf or invalid labels; cannot evaluate",
                        agreed=True)
    loss = totals[0] / info.n_rows
    return loss, (totals[1] / info.n_rows if info.task == "classification" else None)
