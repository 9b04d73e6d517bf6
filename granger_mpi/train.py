"""The training loop (DESIGN.md §3): read rows, loss+gradient, allreduce, update.

One fused message per step: the exchange buffer holds the gradient followed by three
statistics (loss, correct predictions, a bad-data flag), so a step costs exactly one
allreduce and every rank sees the same numbers.
"""

import json
import os
import shutil
import signal
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from mpi4py import MPI

from granger_mpi import (checkpoint, collectives, dataset, metrics, modelfile, models, optimizer,
                         partition, threads, zero)
from granger_mpi.errors import UserError
from granger_mpi.kernels import checks
from granger_mpi.runtime import agree, bcast_text

# After the gradient: loss / batch, correct / batch, rows with bad data, checkpoint asked
# for (SIGUSR1, timer), stop asked for (SIGTERM, STOP file). Summed, so all ranks agree.
N_STATS = 5
LOSS, CORRECT, BAD, SAVE, STOP = range(N_STATS)


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
    stopped: bool = False            # stopped on request after a checkpoint
    checkpoint: Path | None = None   # the last checkpoint written
    comm: object = None              # the communicator the run ended on (shrunk after failures)
    ranks_lost: int = 0


class Requests:
    """Signals turned into flags that the next step's allreduce shares with every rank."""

    def __init__(self):
        self.save = False
        self.stop = False
        self._old = {}

    def __enter__(self):
        def on_usr1(signum, frame):
            self.save = True

        def on_term(signum, frame):
            self.save = self.stop = True
        for signum, handler in ((signal.SIGUSR1, on_usr1), (signal.SIGTERM, on_term)):
            self._old[signum] = signal.signal(signum, handler)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._old.items():
            signal.signal(signum, handler)


def prepare(comm, job, overwrite=False, resume=None):
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
        if taken and not overwrite and resume is None:
            raise UserError(f"[output].run_dir {run_dir} already holds a run ({', '.join(taken)}); "
                            f"choose another run_dir or pass --overwrite")
        return info, model
    return agree(comm, check)


def discard_previous_run(comm, job):
    """Remove an earlier run's checkpoints and STOP file (``--overwrite``), so that a later
    ``--resume auto`` can never pick up a checkpoint of the run this one replaced."""
    if comm.Get_rank() == 0:
        shutil.rmtree(checkpoint.checkpoint_dir(job.output.run_dir), ignore_errors=True)
        (job.output.run_dir / "STOP").unlink(missing_ok=True)
        (job.output.run_dir / "COMPLETE").unlink(missing_ok=True)
    comm.Barrier()


def warm_kernels(comm, model, info, opt):
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
        opt.warm()
    if comm.Get_rank() == 0:
        touch()
    comm.Barrier()
    if comm.Get_rank() != 0:
        touch()


def _open_row_log(rank):
    """With ``GRANGER_ROW_LOG=DIR``, each rank appends the rows of every step it starts
    (``epoch step generation row row ...``), for tests to count. ``generation`` counts the
    failures survived: a step redone after a roll-back is counted from its newest
    generation only, and a step that completed before a failure from all its ranks."""
    directory = os.environ.get("GRANGER_ROW_LOG")
    if not directory:
        return None
    # Line-buffered: a rank that is killed must not lose the rows of steps it completed.
    return open(Path(directory) / f"rows-{os.getpid()}-rank{rank}.txt", "a", buffering=1)


def _first_bad_row(info, X, y):
    if info.task == "classification":
        return checks.first_bad_row_classification(X, y, info.n_classes)
    return checks.first_bad_row_regression(X, y)


def find_resume(comm, job, resume, log):
    """The checkpoint to resume from: ``"auto"`` (newest that verifies, or None) or a path.

    Collective: rank 0 decides and tells the others.
    """
    def choose():
        if comm.Get_rank() != 0:
            return ""
        if resume == "auto":
            path = checkpoint.newest_good(job.output.run_dir, report=log)
            if path is None:
                log(f"no good checkpoint in {checkpoint.checkpoint_dir(job.output.run_dir)}: starting fresh")
            return "" if path is None else str(path)
        problems = checkpoint.verify(resume)
        if problems:
            raise UserError(f"--resume {resume}: {problems[0]}")
        return str(resume)
    text = bcast_text(comm, agree(comm, choose), 0)
    return Path(text) if text else None


class RankFailure(Exception):
    """Ranks died and the run cannot go on (ULFM missing or the job's [fault] limits hit)."""


FAILURE_CLASSES = None


def _is_rank_failure(exc):
    global FAILURE_CLASSES
    if FAILURE_CLASSES is None:
        FAILURE_CLASSES = {getattr(MPI, name) for name in
                           ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")
                           if hasattr(MPI, name)}
    return exc.Get_error_class() in FAILURE_CLASSES


def fault_mode(comm, job, log):
    """True for ULFM (revoke/shrink/carry on), False for restart; decided by a real probe."""
    from granger_mpi.doctor import probe_ulfm
    works, detail = probe_ulfm()
    flags = np.array([1 if works else 0], np.int64)
    comm.Allreduce(MPI.IN_PLACE, flags, op=MPI.MIN)
    works = bool(flags[0])
    if job.fault.mode == "ulfm" and not works:
        raise UserError(f"[fault].mode = 'ulfm' but ULFM does not work in this job: {detail}",
                        agreed=True)
    ulfm = works and job.fault.mode != "restart"
    if comm.Get_rank() == 0:
        log(f"fault tolerance: {'ULFM (revoke, shrink, carry on)' if ulfm else 'restart from checkpoints'}"
            f"{'' if works or job.fault.mode == 'restart' else ' (' + detail + ')'}")
    return ulfm


def _reopen_metrics(run_dir, job, resume_step, log):
    """Metrics after a failure: the file cut back to ``resume_step``; if the old rank 0 died
    while writing it and left it unreadable, it is kept aside and a new one started."""
    path = run_dir / "metrics.h5"
    try:
        return metrics.MetricsFile(path, job.output.metrics_flush_steps, resume_step=resume_step)
    except (OSError, RuntimeError, KeyError) as exc:
        aside = path.with_name(f"metrics.damaged-{int(time.time())}.h5")
        path.replace(aside)
        log(f"metrics file {path} unreadable after the failure ({exc}); kept as {aside}, "
            f"starting a new one at step {resume_step}")
        return metrics.MetricsFile(path, job.output.metrics_flush_steps)


def _recover(comm, job, exc, completed, params, velocity, before, step_index, lost_before, log):
    """Revoke, shrink, agree on the last step every survivor completed, roll back to it.

    Returns ``(new communicator, step to continue from, ranks lost now)``. Raises
    ``RankFailure`` when the job's [fault] limits are passed.
    """
    started = time.perf_counter()
    try:
        comm.Revoke()
    except MPI.Exception:
        pass   # already revoked by another survivor
    new = comm.Shrink()
    new.Set_errhandler(MPI.ERRORS_RETURN)
    lost = comm.Get_size() - new.Get_size()
    agreed = np.array([completed], np.int64)
    new.Allreduce(MPI.IN_PLACE, agreed, op=MPI.MIN)
    if completed > agreed[0]:       # this rank applied the step the others did not finish
        np.copyto(params, before[0])
        np.copyto(velocity, before[1])
    check_replicas_identical(new, params, "parameters after a rank failure and roll-back")
    if new.Get_rank() == 0:
        log(f"rank failure at step {step_index} ({exc.Get_error_string().strip()}): {lost} rank(s) "
            f"lost; {new.Get_size()} continue from step {int(agreed[0])} "
            f"(revoke+shrink+agree {time.perf_counter() - started:.3f} s)")
    total = lost_before + lost
    if new.Get_size() < job.fault.min_ranks or total > job.fault.max_failures:
        raise RankFailure(f"{total} rank(s) lost in all, {new.Get_size()} left: past [fault] limits "
                          f"(min_ranks {job.fault.min_ranks}, max_failures {job.fault.max_failures})")
    return new, int(agreed[0]), lost


def _check_compatible(path, attrs, job, info):
    """Refuse a checkpoint made for another training problem, naming what differs."""
    saved = json.loads(attrs["job"])
    now = json.loads(job.to_json())
    # Every [optimizer] key shapes the updates (a key the saved job lacks had its default).
    for section, key in (("train", "global_batch"), ("train", "seed"),
                         *(("optimizer", k) for k in sorted(now["optimizer"]))):
        if saved[section].get(key, now[section][key]) != now[section][key]:
            raise UserError(f"checkpoint {path} was made with [{section}].{key} = "
                            f"{saved[section][key]!r}, the job says {now[section][key]!r}")
    if int(attrs.get("n_rows", info.n_rows)) != info.n_rows:
        raise UserError(f"checkpoint {path} was made on a dataset of {int(attrs['n_rows'])} rows, "
                        f"{info.path} has {info.n_rows}")


def train(comm, job, info, model, *, resume=None, log=print):
    """Run the job on ``comm``; rank 0 writes ``model.h5`` and ``metrics.h5``.

    Collective over ``comm``. Parameters stay bitwise identical on every rank (checked at
    the end); the same job at the same world size gives bitwise identical results, also
    when it is stopped and resumed (``resume``: "auto" or a checkpoint path).
    """
    n_threads = threads.configure(comm, job.train.threads_per_rank)
    if job.train.strategy == "async":
        if resume is not None:
            raise UserError("--resume: [train].strategy = 'async' writes no checkpoints", agreed=True)
        from granger_mpi import async_sgd
        return async_sgd.train(comm, job, info, model, log=log)
    rank, size = comm.Get_rank(), comm.Get_size()
    run_dir = job.output.run_dir
    per_epoch = partition.steps_per_epoch(info.n_rows, job.train.global_batch)
    total_steps = per_epoch * job.train.epochs
    if job.train.max_steps is not None:
        total_steps = min(total_steps, job.train.max_steps)
    sharded = job.train.shard_optimizer
    shard = zero.shard_bounds(model.layout.size, model.layout.size + N_STATS, rank, size) if sharded else None
    opt = optimizer.Optimizer(job.optimizer, model.layout.size, total_steps=total_steps,
                              global_batch=job.train.global_batch, shard=shard)
    warm_kernels(comm, model, info, opt)
    state = checkpoint.TrainState(model.init_params(job.train.seed), None, 0, 0, 0, opt.slots)
    source = find_resume(comm, job, resume, log) if resume is not None else None
    if source is not None:
        def load():
            loaded, attrs = checkpoint.read(source, model, opt.slots, shard)
            _check_compatible(source, attrs, job, info)
            return loaded, attrs
        state, attrs = agree(comm, load)
        if rank == 0:
            log(f"resuming from {source}: step {state.step} (epoch {state.epoch}, step "
                f"{state.step_in_epoch}), saved by {int(attrs['world_size'])} rank(s)")
    params = state.params
    # The optimizer's state (velocity, or Adam's m and v; this rank's shard if sharded).
    opt_state = opt.state if state.optimizer_state is None else opt.adopt(state.optimizer_state)
    n_params = params.size
    ulfm = fault_mode(comm, job, log)
    if ulfm and sharded:    # a dead rank's shard is gone: only a restart can bring it back
        ulfm = False
        if rank == 0:
            log("fault tolerance: restart from checkpoints ([train].shard_optimizer)")
    if ulfm:
        # A plain buffer: shared windows are not fault tolerant (DESIGN.md §8), and the state
        # before the latest update is kept so survivors can roll back to a common step.
        exchange = np.zeros(n_params + N_STATS, np.float32)
        before = (params.copy(), opt_state.copy())
    else:
        exchange = collectives.allocate(comm, n_params + N_STATS, np.float32)
    grad, stats = exchange[:n_params], exchange[n_params:]
    micro_batches = job.train.accumulation_steps
    micro_grad = np.empty(n_params, np.float32) if micro_batches > 1 else None
    algorithm = job.collectives.algorithm
    classification = info.task == "classification"

    metrics_file = progress = None
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "job.toml").write_text(job.text)
        metrics_file = metrics.MetricsFile(run_dir / "metrics.h5", job.output.metrics_flush_steps,
                                           {"job": job.to_json(), "world_size": size},
                                           resume_step=state.step if source else None)
        progress = metrics.Progress(total_steps - state.step, job.output.progress_interval_s)
        log(f"training {model.kind} {list(model.sizes)} ({n_params:,} parameters) on "
            f"{info.path} ({info.n_rows:,} rows, {info.task}) with {size} rank(s), "
            f"global batch {job.train.global_batch}, {total_steps} steps, allreduce {algorithm}, "
            f"optimizer {job.optimizer.name}, {n_threads} thread(s) per rank")
        log(f"optimizer state: {opt.state.nbytes:,} bytes per rank"
            + (f" (sharded over {size} ranks; {len(opt.slots) * n_params * 4:,} unsharded)" if sharded else ""))

    started = last_save = time.perf_counter()
    loss = accuracy = float("nan")
    step_index = state.step - 1
    stopped = False
    saved = None
    ckpt = job.checkpoint
    stop_file = run_dir / "STOP"

    def save(next_index):
        nonlocal saved, last_save
        position = checkpoint.TrainState(params, opt_state, next_index, next_index // per_epoch,
                                         next_index % per_epoch, opt.slots, shard)
        saved = checkpoint.save(comm, run_dir, model, position, job_json=job.to_json(),
                                seed=job.train.seed, keep_last=ckpt.keep_last,
                                extra_attrs={"n_rows": info.n_rows},
                                verify_after_write=ckpt.verify_after_write)
        last_save = time.perf_counter()
        if rank == 0:
            log(f"checkpoint {saved} (step {next_index})")

    stream = dataset.BatchStream(info, job.train.global_batch, job.train.seed, size, rank,
                                 epochs=job.train.epochs, max_steps=job.train.max_steps,
                                 start_step=state.step, prefetch_steps=job.data.prefetch_steps,
                                 memory_budget_bytes=int(job.data.memory_budget_mb * 2**20))
    row_log = _open_row_log(rank)
    requests = Requests().__enter__()
    completed = state.step    # steps whose update this rank has applied
    ranks_lost = generation = 0
    batches = iter(stream)
    try:
        while True:
            try:
                epoch, step, batch_len, rows, X, y = next(batches)
            except StopIteration:
                break
            step_index = epoch * per_epoch + step
            t0 = time.perf_counter()
            if row_log is not None:   # generation: how many failures this world has survived
                row_log.write(f"{epoch} {step} {generation} {' '.join(map(str, rows))}\n")
            bad = _first_bad_row(info, X, y) if rows.size else -1
            if bad >= 0:
                exchange[:] = 0
                stats[BAD] = 1
            else:
                scale = np.float32(1.0 / batch_len)
                if rows.size:
                    loss_sum, correct = models.loss_grad_in_micro_batches(
                        model, params, X, y, scale, grad, micro_batches, micro_grad)
                else:
                    grad[:] = 0
                    loss_sum, correct = 0.0, 0
                stats[LOSS] = loss_sum / batch_len
                stats[CORRECT] = correct / batch_len
                stats[BAD] = 0
            if rank == 0:
                if ckpt.every_seconds is not None and time.perf_counter() - last_save >= ckpt.every_seconds:
                    requests.save = True
                if stop_file.exists():
                    requests.save = requests.stop = True
            stats[SAVE] = 1 if requests.save else 0
            stats[STOP] = 1 if requests.stop else 0
            requests.save = requests.stop = False
            try:
                if sharded:   # the update happens inside, between reduce-scatter and allgather
                    grad_norm, lr = zero.exchange_and_update(comm, opt, exchange, params, step_index)
                else:
                    collectives.allreduce(comm, exchange, algorithm=algorithm,
                                          ranks_per_node=job.collectives.ranks_per_node)
            except MPI.Exception as exc:
                if not (ulfm and _is_rank_failure(exc)):
                    raise
                comm, completed, lost = _recover(comm, job, exc, completed, params, opt_state,
                                                 before, step_index, ranks_lost, log)
                ranks_lost += lost
                generation += 1
                rank, size = comm.Get_rank(), comm.Get_size()
                stream.close()
                stream = dataset.BatchStream(
                    info, job.train.global_batch, job.train.seed, size, rank,
                    epochs=job.train.epochs, max_steps=job.train.max_steps, start_step=completed,
                    prefetch_steps=job.data.prefetch_steps,
                    memory_budget_bytes=int(job.data.memory_budget_mb * 2**20))
                batches = iter(stream)
                if rank == 0:
                    if metrics_file is not None:
                        metrics_file.close()
                    run_dir.mkdir(parents=True, exist_ok=True)
                    metrics_file = _reopen_metrics(run_dir, job, completed, log)
                    progress = progress or metrics.Progress(total_steps - completed,
                                                            job.output.progress_interval_s)
                continue
            if stats[BAD] > 0:
                _report_bad_row(comm, info, rows[bad] if bad >= 0 else None, epoch, step)
            if ulfm:
                np.copyto(before[0], params)
                np.copyto(before[1], opt_state)
            if not sharded:
                grad_norm = opt.clip(grad)
                lr = opt.step(params, grad, step_index)
            completed = step_index + 1
            loss = float(stats[LOSS])
            accuracy = float(stats[CORRECT]) if classification else None
            if rank == 0:
                step_time = time.perf_counter() - t0
                metrics_file.append(step=step_index, epoch=epoch, loss=loss,
                                    accuracy=np.nan if accuracy is None else accuracy,
                                    grad_norm=grad_norm, learning_rate=lr, step_time_s=step_time,
                                    samples_per_s=batch_len / max(step_time, 1e-12))
                progress.update(step_index - state.step, epoch, job.train.epochs, loss, accuracy,
                                batch_len, force=step_index + 1 == total_steps)
            done = step_index + 1
            periodic = ckpt.every_steps is not None and done % ckpt.every_steps == 0
            if (stats[SAVE] > 0 or stats[STOP] > 0 or periodic) and done < total_steps:
                if metrics_file is not None:
                    metrics_file.flush()
                save(done)
            if stats[STOP] > 0 and done < total_steps:
                if rank == 0 and stop_file.exists():
                    stop_file.unlink()    # honoured; a resumed run must not stop again at once
                stopped = True
                break
    finally:
        requests.__exit__()
        stream.close()
        if row_log is not None:
            row_log.close()
        if metrics_file is not None:
            metrics_file.close()

    check_replicas_identical(comm, params, "parameters at the end of training")
    seconds = time.perf_counter() - started
    model_path = run_dir / "model.h5"
    if stopped:
        if rank == 0:
            log(f"stopped on request after step {step_index + 1}; resume with --resume auto")
        return TrainResult(step_index + 1, loss, accuracy, model_path, run_dir / "metrics.h5",
                           seconds=seconds, stopped=True, checkpoint=saved, comm=comm,
                           ranks_lost=ranks_lost)
    if ckpt.at_end and step_index + 1 > state.step:
        save(step_index + 1)
    if rank == 0:
        modelfile.save(model_path, model, params,
                       attrs={"job": job.to_json(), "step": step_index + 1, "world_size": size})
        from granger_mpi.supervise import write_completion
        write_completion(run_dir, {"steps": step_index + 1, "world_size": size,
                                   "ranks_lost": ranks_lost, "model": str(model_path),
                                   "finished_at": time.time()})
    result = TrainResult(step_index + 1, loss, accuracy, model_path, run_dir / "metrics.h5",
                         seconds=seconds, checkpoint=saved, comm=comm, ranks_lost=ranks_lost)
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
