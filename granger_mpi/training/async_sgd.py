"""Asynchronous SGD (``[train].strategy = "async"``): one parameter server, P - 1 workers.

Rank 0 holds the parameters and the optimizer; every other rank is a worker that reads
its share of each step's rows (the step's global batch split over the workers, so every
sample is used once per epoch), computes a gradient on the parameters it last received,
pushes it to the server with a nonblocking send and receives the parameters the server
replies with. The server applies gradients in the order they arrive (``Waitany``): a
gradient computed on parameters ``s`` updates old (its staleness) is weighted by
``1 / (1 + s)`` (``[train].staleness_weight = "inverse"``; ``"constant"`` keeps 1) and
dropped when ``s > [train].max_staleness``.

Unlike synchronous training this is not deterministic: arrival order depends on timing.
Staleness of every gradient goes to ``metrics.h5`` (``/staleness``, and
``/staleness_histogram``: count per staleness 0, 1, 2, ...). No checkpoints are written.
"""

import time

import h5py
import numpy as np
from mpi4py import MPI

from granger_mpi import rundir
from granger_mpi.data import dataset
from granger_mpi.model import modelfile, models, optimizer
from granger_mpi.observe import metrics
from granger_mpi.errors import UserError
from granger_mpi.kernels import checks, optim
from granger_mpi.training.evaluation import evaluate
from granger_mpi.training.result import TrainResult
from granger_mpi.training.setup import warm_kernels
from granger_mpi.training.trainer import total_steps

SERVER = 0
TAG_PUSH = 0x6173   # worker -> server: gradient and header
TAG_PARAMS = 0x6174  # server -> worker: parameters
# Header after the gradient in a push: loss sum, correct, rows, kind, epoch.
N_HEADER = 5
LOSS, CORRECT, ROWS, KIND, EPOCH = range(N_HEADER)
GRADIENT, DONE = 1.0, 2.0


def staleness_weight(kind, staleness):
    """The factor a gradient ``staleness`` updates old is multiplied by."""
    return 1.0 / (1.0 + staleness) if kind == "inverse" else 1.0


def train(comm, job, info, model, *, log=print):
    """Run the job asynchronously on ``comm`` (rank 0 serves, the others work).

    Collective over ``comm``; returns a ``TrainResult`` with the parameters
    broadcast to every rank (so that evaluation can be collective).
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 2:
        raise UserError("[train].strategy = 'async' needs at least 2 ranks (a server and a worker)",
                        agreed=True)
    workers = size - 1
    steps = total_steps(job, info)
    opt = optimizer.Optimizer(job.optimizer, model.layout.size, total_steps=steps * workers,
                              global_batch=job.train.global_batch)
    warm_kernels(comm, model, info, opt)
    params = model.init_params(job.train.seed)
    started = time.perf_counter()
    if rank == SERVER:
        result = _serve(comm, job, info, model, params, opt, steps, log)
    else:
        _work(comm, job, info, model, params, rank - 1, workers)
        result = (float("nan"), None, 0)
    comm.Bcast(params, root=SERVER)
    loss, accuracy, updates = result
    seconds = time.perf_counter() - started
    run = rundir.RunDir(job.output.run_dir)
    if rank == SERVER:
        modelfile.save(run.model, model, params,
                       attrs={"job": job.to_json(), "step": updates, "world_size": size})
        run.write_completion({"steps": updates, "world_size": size, "ranks_lost": 0,
                              "model": str(run.model), "finished_at": time.time()})
    out = TrainResult(updates, loss, accuracy, run.model, run.metrics, seconds=seconds, world_size=size)
    if job.data.test_path is not None:
        out.test_loss, out.test_accuracy = evaluate(comm, model, params, dataset.open_info(job.data.test_path, job.data.allow_external_storage))
    comm.Barrier()
    return out


def _work(comm, job, info, model, params, worker, workers):
    """A worker: gradients of its rows pushed to the server, parameters pulled back."""
    n = params.size
    push = np.zeros(n + N_HEADER, np.float32)
    grad, header = push[:n], push[n:]
    micro = job.train.accumulation_steps
    scratch = np.empty(n, np.float32) if micro > 1 else None
    comm.Recv(params, source=SERVER, tag=TAG_PARAMS)
    stream = dataset.BatchStream(info, job.train.global_batch, job.train.seed, workers, worker,
                                 epochs=job.train.epochs, max_steps=job.train.max_steps,
                                 prefetch_steps=job.data.prefetch_steps,
                                 memory_budget_bytes=int(job.data.memory_budget_mb * 2**20))
    try:
        for epoch, step, _, rows, X, y in stream:
            if not rows.size:
                continue
            bad = (checks.first_bad_row_classification(X, y, info.n_classes) if info.task == "classification"
                   else checks.first_bad_row_regression(X, y))
            if bad >= 0:   # only this rank knows: the CLI aborts the job with this message
                raise UserError(f"{info.path}: row {int(rows[bad])} has a NaN/Inf feature or an invalid "
                                f"target (found by worker {worker} at epoch {epoch}, step {step})")
            loss_sum, correct = models.loss_grad_in_micro_batches(
                model, params, X, y, np.float32(1.0 / rows.size), grad, micro, scratch)
            header[:] = (loss_sum, correct, rows.size, GRADIENT, epoch)
            request = comm.Isend(push, dest=SERVER, tag=TAG_PUSH)
            comm.Recv(params, source=SERVER, tag=TAG_PARAMS)
            request.Wait()
    finally:
        stream.close()
    header[KIND] = DONE
    comm.Send(push, dest=SERVER, tag=TAG_PUSH)


def _serve(comm, job, info, model, params, opt, steps, log):
    """The server: apply pushed gradients as they arrive, reply with the parameters."""
    n = params.size
    workers = comm.Get_size() - 1
    cfg = job.train
    run = rundir.RunDir(job.output.run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    run.job.write_text(job.text)
    log(f"training {model.kind} {list(model.sizes)} ({n:,} parameters) on {info.path} "
        f"({info.n_rows:,} rows, {info.task}) asynchronously: 1 server, {workers} worker(s), "
        f"{steps} steps of global batch {job.train.global_batch}, staleness weight "
        f"{cfg.staleness_weight}, max staleness {cfg.max_staleness}; no checkpoints")
    inbox = [np.empty(n + N_HEADER, np.float32) for _ in range(workers)]
    outbox = [params.copy() for _ in range(workers)]
    sends = [comm.Isend(outbox[w], dest=w + 1, tag=TAG_PARAMS) for w in range(workers)]
    receives = [comm.Irecv(inbox[w], source=w + 1, tag=TAG_PUSH) for w in range(workers)]
    sent_version = [0] * workers
    version = 0           # updates applied
    staleness_seen = []
    dropped = 0
    active = workers
    loss = accuracy = float("nan")
    classification = info.task == "classification"
    sinks = metrics.open_sinks(run.path, job, {"job": job.to_json(), "world_size": comm.Get_size(),
                                              "strategy": "async"})
    progress = metrics.Progress(steps * workers, job.output.progress_interval_s, log)
    last = time.perf_counter()
    try:
        while active:
            w = MPI.Request.Waitany(receives)
            message = inbox[w]
            header = message[n:]
            if header[KIND] == DONE:
                active -= 1
                receives[w] = MPI.REQUEST_NULL
                continue
            staleness = version - sent_version[w]
            staleness_seen.append(staleness)
            rows = int(header[ROWS])
            loss = float(header[LOSS]) / rows
            accuracy = float(header[CORRECT]) / rows if classification else None
            if staleness > cfg.max_staleness:
                dropped += 1
            else:
                grad = message[:n]
                weight = staleness_weight(cfg.staleness_weight, staleness)
                if weight != 1.0:
                    optim.scale(grad, np.float32(weight))
                grad_norm = opt.clip(grad)
                lr = opt.step(params, grad, version)
                version += 1
                now = time.perf_counter()
                sinks.step(dict(step=version - 1, epoch=int(header[EPOCH]), loss=loss,
                                       accuracy=np.nan if accuracy is None else accuracy,
                                       grad_norm=grad_norm, learning_rate=lr, step_time_s=now - last,
                                       samples_per_s=rows / max(now - last, 1e-12),
                                       val_loss=np.nan, val_accuracy=np.nan))   # no validation
                last = now
                progress.update(version - 1, int(header[EPOCH]), job.train.epochs, loss, accuracy, rows)
            sends[w].Wait()
            outbox[w][:] = params
            sends[w] = comm.Isend(outbox[w], dest=w + 1, tag=TAG_PARAMS)
            sent_version[w] = version
            receives[w] = comm.Irecv(inbox[w], source=w + 1, tag=TAG_PUSH)
        MPI.Request.Waitall(sends)
    finally:
        sinks.close()
    histogram = np.bincount(np.asarray(staleness_seen, np.int64), minlength=1)
    with h5py.File(run.metrics, "a") as f:
        f.create_dataset("staleness", data=np.asarray(staleness_seen, np.int64))
        f.create_dataset("staleness_histogram", data=histogram)
        f.attrs["gradients_dropped"] = dropped
    received = len(staleness_seen)
    log(f"staleness over {received} gradients: mean {np.mean(staleness_seen) if received else 0:.2f}, "
        f"max {max(staleness_seen, default=0)}, dropped {dropped} (> {cfg.max_staleness}); histogram "
        + " ".join(f"{s}:{c}" for s, c in enumerate(histogram) if c))
    return loss, accuracy, version
