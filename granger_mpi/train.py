"""The training loop (DESIGN.md §3): read rows, loss+gradient, allreduce, update.

One fused message per step: the exchange buffer holds the gradient followed by three
statistics (loss, correct predictions, a bad-data flag), so a step costs exactly one
allreduce and every rank sees the same numbers.
"""

import json
import math
import os
import shutil
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from mpi4py import MPI

from granger_mpi import (checkpoint, collectives, dataset, faults, metrics, modelfile, models,
                         optimizer, partition, status, threads, timing, zero)
from granger_mpi.checksums import crc32
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
    limit_reason: str | None = None  # stopped because ranks died past the [fault] limits


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
                log(f"no checkpoint in {checkpoint.checkpoint_dir(job.output.run_dir)} (the run ended "
                    f"before its first save): starting fresh from step 0")
            return "" if path is None else str(path)
        problems = checkpoint.verify(resume)
        if problems:
            raise UserError(f"--resume {resume}: {problems[0]}")
        return str(resume)
    text = bcast_text(comm, agree(comm, choose), 0)
    return Path(text) if text else None


FAILURE_CLASSES = None


def _is_rank_failure(exc, comm):
    """Whether an MPI error means a peer died (some ranks see only MPI_ERR_OTHER from a
    collective that a dead rank broke, so ULFM's list of failed ranks is asked as well)."""
    global FAILURE_CLASSES
    if FAILURE_CLASSES is None:
        FAILURE_CLASSES = {getattr(MPI, name) for name in
                           ("ERR_PROC_FAILED", "ERR_PROC_FAILED_PENDING", "ERR_REVOKED")
                           if hasattr(MPI, name)}
    if exc.Get_error_class() in FAILURE_CLASSES:
        return True
    try:
        return comm.Get_failed().Get_size() > 0
    except (MPI.Exception, NotImplementedError):
        return False


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


def _reopen_reporters(run_dir, job, resume_step, log):
    """The sinks after a failure, cut back to ``resume_step``; if the old rank 0 died while
    writing ``metrics.h5`` and left it unreadable, it is kept aside and a new one started."""
    path = run_dir / "metrics.h5"
    try:
        return metrics.open_sinks(run_dir, job, None, resume_step)
    except (OSError, RuntimeError, KeyError) as exc:
        aside = path.with_name(f"metrics.damaged-{int(time.time())}.h5")
        path.replace(aside)
        log(f"metrics file {path} unreadable after the failure ({exc}); kept as {aside}, "
            f"starting a new one at step {resume_step}")
        return metrics.open_sinks(run_dir, job, None, None)


def _recover(comm, completed, params, opt_state, before, idents):
    """Revoke, shrink, agree on the last step every survivor completed, roll back to it.

    ``idents`` are the world ranks of ``comm``'s ranks. Returns ``(new communicator, step to
    continue from, world ranks of the survivors)``; a failure during the recovery itself
    shrinks again.
    """
    while True:
        try:
            comm.Revoke()
        except MPI.Exception:
            pass   # already revoked by another survivor
        new = comm.Shrink()
        new.Set_errhandler(MPI.ERRORS_RETURN)
        try:
            me = np.array([idents[comm.Get_rank()]], np.int64)
            survivors = np.empty(new.Get_size(), np.int64)
            new.Allgather(me, survivors)
            agreed = np.array([completed], np.int64)
            new.Allreduce(MPI.IN_PLACE, agreed, op=MPI.MIN)
            if completed > agreed[0]:   # this rank applied the step the others did not finish
                np.copyto(params, before[0])
                np.copyto(opt_state, before[1])
                completed = int(agreed[0])
            check_replicas_identical(new, params, "parameters after a rank failure and roll-back")
            return new, int(agreed[0]), survivors.tolist()
        except MPI.Exception as exc:
            if not _is_rank_failure(exc, new):
                raise
            idents = [idents[r] for r in _translate(new, comm)]
            comm = new     # another rank died while recovering: shrink again


def _translate(new, old):
    """Ranks in ``old`` of every rank of ``new``."""
    return MPI.Group.Translate_ranks(new.Get_group(), list(range(new.Get_size())), old.Get_group())


def _hosts(comm):
    """Host name of every rank of ``comm`` (buffer calls, no pickle)."""
    mine = np.zeros(64, np.uint8)
    name = socket.gethostname().encode()[:64]
    mine[:len(name)] = np.frombuffer(name, np.uint8)
    every = np.empty((comm.Get_size(), 64), np.uint8)
    comm.Allgather(mine, every)
    return [row.tobytes().rstrip(b"\0").decode() for row in every]


def _past_limits(fault, size, lost, hosts):
    """Why the run must stop after losing world ranks ``lost`` (None if it may go on)."""
    if size < fault.min_ranks:
        return f"{size} rank(s) left, [fault].min_ranks is {fault.min_ranks}"
    if len(lost) > fault.max_failures:
        return f"{len(lost)} rank(s) lost in all, [fault].max_failures is {fault.max_failures}"
    if not lost:
        return None
    per_host = Counter(hosts[r] for r in lost)
    host, count = per_host.most_common(1)[0]
    if count > fault.max_failures_per_node:
        return (f"{count} rank(s) lost on host {host}, [fault].max_failures_per_node is "
                f"{fault.max_failures_per_node}")
    return None


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


def train(comm, job, info, model, *, resume=None, log=print, injections=(), abort=None):
    """Run the job on ``comm``; rank 0 writes ``model.h5`` and ``metrics.h5``.

    Collective over ``comm``. Parameters stay bitwise identical on every rank (checked at
    the end); the same job at the same world size gives bitwise identical results, also
    when it is stopped and resumed (``resume``: "auto" or a checkpoint path). Under ULFM,
    rank failures are survived (see ``recover`` below). ``injections`` are planned failures
    (``faults.Injection``); ``abort(code)`` ends the whole job (the hang watchdog's exit).
    """
    n_threads = threads.configure(comm, job.train.threads_per_rank)
    if job.train.strategy == "async":
        if resume is not None:
            raise UserError("--resume: [train].strategy = 'async' writes no checkpoints", agreed=True)
        from granger_mpi import async_sgd
        return async_sgd.train(comm, job, info, model, log=log)
    rank, size = comm.Get_rank(), comm.Get_size()
    idents = list(range(size))     # world rank of each rank of ``comm``: kept across shrinks
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
    algorithm = job.collectives.algorithm
    if ulfm:
        if algorithm not in collectives.FAULT_TOLERANT + ("auto",):
            raise UserError(f"[collectives].algorithm = {algorithm!r} uses shared-memory windows, "
                            f"which ULFM cannot repair after a failure; use one of "
                            f"{', '.join(collectives.FAULT_TOLERANT)} or auto, or [fault].mode = "
                            f"'restart'", agreed=True)
        # A plain buffer (shared windows are not fault tolerant, DESIGN.md §8), and the state
        # before the latest update, so survivors can roll back to a common step.
        exchange = np.zeros(n_params + N_STATS, np.float32)
        before = (params.copy(), opt_state.copy())
    else:
        exchange = collectives.allocate(comm, n_params + N_STATS, np.float32)
        before = None
    grad, stats = exchange[:n_params], exchange[n_params:]
    micro_batches = job.train.accumulation_steps
    micro_grad = np.empty(n_params, np.float32) if micro_batches > 1 else None

    def choose_algorithm():
        if ulfm and job.collectives.algorithm == "auto":
            return collectives.auto.choose(comm, exchange.nbytes, collectives.FAULT_TOLERANT)
        return job.collectives.algorithm
    algorithm = choose_algorithm()
    classification = info.task == "classification"

    hosts = _hosts(comm)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        status.clear(run_dir, size)
    comm.Barrier()
    fault = job.fault
    rank_status = status.RankStatus(
        run_dir, rank, size, "ulfm" if ulfm else "restart", interval_s=fault.status_interval_s,
        step_timeout_s=fault.step_timeout_s, slow_timeout_s=fault.checkpoint_timeout_s,
        abort=abort or comm.Abort).start()
    try:
        injector = faults.Injector(injections, rank)

        sinks = progress = None

        def open_outputs():
            if rank == 0:
                (run_dir / "job.toml").write_text(job.text)
                return metrics.open_sinks(run_dir, job, {"job": job.to_json(), "world_size": size},
                                       state.step if source else None)
        sinks = agree(comm, open_outputs)    # rank 0's Reporters; a user's may fail: all stop
        if rank == 0:
            progress = metrics.Progress(total_steps - state.step, job.output.progress_interval_s)
            log(f"training {model.kind} {list(model.sizes)} ({n_params:,} parameters) on "
                f"{info.path} ({info.n_rows:,} rows, {info.task}) with {size} rank(s), "
                f"global batch {job.train.global_batch}, {total_steps} steps, allreduce {algorithm}, "
                f"optimizer {job.optimizer.name}, {n_threads} thread(s) per rank")
            log(f"optimizer state: {opt.state.nbytes:,} bytes per rank" +
                (f" (sharded over {size} ranks; {len(opt.slots) * n_params * 4:,} unsharded)"
                 if sharded else ""))

        started = last_save = time.perf_counter()
        loss = accuracy = float("nan")
        step_index = state.step - 1
        stopped = False
        limit_reason = None      # why the run stopped after losing ranks
        saved = None
        ckpt = job.checkpoint
        stop_file = run_dir / "STOP"

        def open_stream(start_step):
            return dataset.BatchStream(info, job.train.global_batch, job.train.seed, size, rank,
                                       epochs=job.train.epochs, max_steps=job.train.max_steps,
                                       start_step=start_step, prefetch_steps=job.data.prefetch_steps,
                                       memory_budget_bytes=int(job.data.memory_budget_mb * 2**20))

        stream = open_stream(state.step)
        batches = iter(stream)
        row_log = _open_row_log(rank)
        requests = Requests().__enter__()
        completed = state.step    # steps whose update this rank has applied
        lost_ranks = []           # world ranks lost so far
        generation = 0            # failures survived (for the row log)
        pending_event = None      # a recovery waiting for its first completed step

        def recover(exc, where):
            """After a rank failure: a working communicator, rolled back to a common step, the
            rest of the epoch re-split among the survivors. Returns why the run must stop now
            (the [fault] limits), or None to carry on."""
            nonlocal comm, rank, size, idents, completed, generation, stream, batches
            nonlocal sinks, progress, algorithm, pending_event
            detected, entered = time.time(), rank_status.since
            rank_status.set(status.RECOVERING, note=f"rank failure during {where}")
            old_size = size
            comm, completed, idents = _recover(comm, completed, params, opt_state, before, idents)
            rank, size = comm.Get_rank(), comm.Get_size()
            gone = sorted(set(range(len(hosts))) - set(idents) - set(lost_ranks))
            lost_ranks.extend(gone)
            generation += 1
            rank_status.ranks_alive, rank_status.failures = size, len(lost_ranks)
            recovery_s = time.time() - detected
            algorithm = choose_algorithm()
            if rank == 0:
                status.mark_failed(run_dir, gone, f"lost at step {step_index} ({where})", step_index)
                log(f"rank failure at step {step_index} during {where} "
                    f"({exc.Get_error_string().strip()}): {old_size - size} rank(s) lost "
                    f"(world ranks {gone}); {size} continue from step {completed} "
                    f"(revoke+shrink+agree {recovery_s:.3f} s)")
            if rank == 0 and stream is not None:    # still training: metrics go on
                if sinks is not None:
                    sinks.close()
                sinks = _reopen_reporters(run_dir, job, completed, log)
                progress = progress or metrics.Progress(total_steps - completed,
                                                        job.output.progress_interval_s)
            pending_event = dict(time=detected, step=completed, kind=f"rank failure ({where})",
                                 ranks_lost=len(gone), world_size=size,
                                 detect_s=detected - entered,
                                 recovery_s=recovery_s)
            if stream is not None:
                stream.close()
                stream = open_stream(completed)
                batches = iter(stream)
            return _past_limits(fault, size, lost_ranks, hosts)

        def guarded(fn, where):
            """``fn()``; under ULFM a rank failure inside it is recovered from and ``fn`` rerun.
            Returns (result, why the run must stop or None)."""
            while True:
                try:
                    return fn(), None
                except MPI.Exception as exc:
                    if not (ulfm and _is_rank_failure(exc, comm)):
                        raise
                    reason = recover(exc, where)
                    if reason:
                        return None, reason

        writer = checkpoint.AsyncSaver()

        def finish_background_save():
            """Wait for the checkpoint being written in the background, if any."""
            nonlocal saved
            step = writer.step
            path = writer.wait(comm)
            if path is not None:
                saved = path
                if rank == 0:
                    log(f"checkpoint {saved} (step {step}, written in the background)")

        def save(next_index, on_written=None, background=False):
            nonlocal saved, last_save
            rank_status.set(status.CHECKPOINTING, note=f"checkpoint at step {next_index}")
            # A USR1 that reached this rank a step later than the others is served by this
            # save too; left set, it would ask for a second checkpoint at the next step.
            requests.save = False
            finish_background_save()    # one in flight at most, published in step order
            position = checkpoint.TrainState(params, opt_state, next_index, next_index // per_epoch,
                                             next_index % per_epoch, opt.slots, shard)
            save_args = dict(job_json=job.to_json(), seed=job.train.seed, keep_last=ckpt.keep_last,
                             extra_attrs={"n_rows": info.n_rows},
                             verify_after_write=ckpt.verify_after_write)
            if background and ckpt.async_write and not (sharded or ulfm):
                if on_written is not None:
                    on_written()
                writer.start(comm, run_dir, model, position, **save_args)
            else:
                saved = checkpoint.save(comm, run_dir, model, position, on_written=on_written,
                                        parallel_from_bytes=math.inf if ulfm else
                                        ckpt.parallel_write_from_mib * 2**20, **save_args)
                if rank == 0:
                    log(f"checkpoint {saved} (step {next_index})")
            last_save = time.perf_counter()
            timer.lap(timing.CHECKPOINT)

        def stop_past_limits(reason):
            if rank == 0:
                log(f"stopping (exit code 5): {reason}; " + (
                    f"saving a checkpoint at step {completed}; continue with --resume auto"
                    if fault.on_limit == "stop" else "continue with --resume auto"))
            if fault.on_limit == "stop":
                if sinks is not None:
                    sinks.flush()
                save(completed)

        timer = timing.PhaseTimer()

        def report_timings(done):
            """Every ``timing_every_steps`` steps and at the end: the window's per-rank split."""
            window = timer.gather(comm, idents, len(hosts))
            if window is not None:
                sinks.timings({"step": done - 1, **window})

        try:
            timer.start()
            while True:
                timer.lap(timing.OTHER)    # the previous step's bookkeeping
                try:
                    epoch, step, batch_len, rows, X, y = next(batches)
                except StopIteration:
                    break
                timer.lap(timing.DATA)
                step_index = epoch * per_epoch + step
                t0 = time.perf_counter()
                rank_status.set(status.TRAINING, step_index)
                injector.at_compute(step_index)
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
                rank_status.set(status.AGGREGATING)
                injector.arm_allreduce(step_index, algorithm)
                timer.lap(timing.COMPUTE)
                try:
                    if sharded:   # the update happens inside, between reduce-scatter and allgather
                        grad_norm, lr = zero.exchange_and_update(comm, opt, exchange, params, step_index)
                    else:
                        collectives.allreduce(comm, exchange, algorithm=algorithm,
                                              ranks_per_node=job.collectives.ranks_per_node)
                except MPI.Exception as exc:
                    if not (ulfm and _is_rank_failure(exc, comm)):
                        raise
                    limit_reason = recover(exc, f"the allreduce ({algorithm})")
                    if limit_reason:
                        break
                    continue
                timer.lap(timing.COMM)
                if stats[BAD] > 0:
                    _report_bad_row(comm, info, rows[bad] if bad >= 0 else None, epoch, step)
                if ulfm:
                    np.copyto(before[0], params)
                    np.copyto(before[1], opt_state)
                if not sharded:
                    grad_norm = opt.clip(grad)
                    lr = opt.step(params, grad, step_index)
                completed = step_index + 1
                timer.lap(timing.COMPUTE)
                timer.steps += 1
                loss = float(stats[LOSS])
                accuracy = float(stats[CORRECT]) if classification else None
                if rank == 0:
                    step_time = time.perf_counter() - t0
                    sinks.step(dict(step=step_index, epoch=epoch, loss=loss,
                                    accuracy=np.nan if accuracy is None else accuracy,
                                    grad_norm=grad_norm, learning_rate=lr, step_time_s=step_time,
                                    samples_per_s=batch_len / max(step_time, 1e-12)))
                    progress.update(step_index - state.step, epoch, job.train.epochs, loss, accuracy,
                                    batch_len, force=step_index + 1 == total_steps,
                                    detail=f"allreduce {collectives.in_use(comm, exchange.nbytes, algorithm)} "
                                           f"faults {'ulfm' if ulfm else 'restart'}")
                if pending_event is not None:
                    if rank == 0:
                        pending_event["first_step_s"] = time.time() - pending_event["time"]
                        sinks.event(pending_event)
                        log(f"first step after the failure completed {pending_event['first_step_s']:.3f} s "
                            f"after it was detected")
                    pending_event = None
                done = step_index + 1
                periodic = ckpt.every_steps is not None and done % ckpt.every_steps == 0
                if (stats[SAVE] > 0 or stats[STOP] > 0 or periodic) and done < total_steps:
                    if sinks is not None:
                        sinks.flush()
                    timer.lap(timing.OTHER)    # this step's metrics and progress, as in any step
                    _, limit_reason = guarded(
                        lambda: save(done, injector.checkpoint_hook(done), background=stats[STOP] == 0),
                        "a checkpoint")
                    if limit_reason:
                        break
                if stats[STOP] > 0 and done < total_steps:
                    if rank == 0 and stop_file.exists():
                        stop_file.unlink()    # honoured; a resumed run must not stop again at once
                    stopped = True
                    break
                # Last in the step, so that the survivors of a failure here all go on to the
                # same place: a Gather's root sees a dead rank that the others do not, and
                # those fail in the next step's allreduce instead; both recover and continue.
                if done % job.output.timing_every_steps == 0 or done == total_steps:
                    try:
                        injector.at_report(step_index)
                        report_timings(done)
                    except MPI.Exception as exc:
                        if not (ulfm and _is_rank_failure(exc, comm)):
                            raise
                        limit_reason = recover(exc, "a timing report")
                        if limit_reason:
                            break
            if limit_reason:
                stop_past_limits(limit_reason)
        finally:
            requests.__exit__()
            stream.close()
            stream = None
            if row_log is not None:
                row_log.close()
            if sinks is not None:
                sinks.close()
                sinks = None

        finish_background_save()

        def finish():
            check_replicas_identical(comm, params, "parameters at the end of training")
            if ckpt.at_end and completed > state.step and (saved is None or saved.name != checkpoint.file_name(completed)):
                save(completed, injector.checkpoint_hook(completed))
        if not (stopped or limit_reason):
            _, limit_reason = guarded(finish, "the end of training")
            if limit_reason:
                stop_past_limits(limit_reason)
        seconds = time.perf_counter() - started
        checkpoint.finish_run()    # old checkpoints are deleted in the background
        model_path = run_dir / "model.h5"
        result = TrainResult(completed, loss, accuracy, model_path, run_dir / "metrics.h5",
                             seconds=seconds, checkpoint=saved, comm=comm, ranks_lost=len(lost_ranks))
        if stopped or limit_reason:
            rank_status.close(note=limit_reason or "stopped on request")
            if rank == 0 and stopped:
                log(f"stopped on request after step {completed}; resume with --resume auto")
            result.stopped, result.limit_reason = True, limit_reason
            return result
        if rank == 0:
            modelfile.save(model_path, model, params,
                           attrs={"job": job.to_json(), "step": completed, "world_size": size})
            from granger_mpi.supervise import write_completion
            write_completion(run_dir, {"steps": completed, "world_size": size,
                                       "ranks_lost": len(lost_ranks), "lost_world_ranks": lost_ranks,
                                       "model": str(model_path), "finished_at": time.time()})
        if job.data.test_path is not None:
            test_info = dataset.open_info(job.data.test_path)
            scores, _ = guarded(lambda: evaluate(comm, model, params, test_info), "the test evaluation")
            result.test_loss, result.test_accuracy = scores or (None, None)
        rank_status.close()
        result.comm = comm
        return result
    except BaseException as exc:
        rank_status.close(status.FAILED, note=f"{type(exc).__name__}: {exc}"[:200])
        raise


def _report_bad_row(comm, info, local_row, epoch, step):
    """Agree on the first bad row any rank saw and raise the same error everywhere."""
    row = np.array([np.iinfo(np.int64).max if local_row is None else local_row], np.int64)
    comm.Allreduce(MPI.IN_PLACE, row, op=MPI.MIN)
    raise UserError(f"{_bad_row(info, int(row[0]))} (found at epoch {epoch}, step {step}); "
                    f"nothing was saved", agreed=True)


def _bad_row(info, row):
    what = f"a label outside [0, {info.n_classes})" if info.task == "classification" else "a NaN/Inf target"
    return f"{info.path}: row {row} has a NaN/Inf feature in /X or {what} in /y"


def check_replicas_identical(comm, params, what):
    """Raise if ``params`` differ between ranks (CRC32 of the bytes, gathered)."""
    crc = np.array([crc32(params)], np.int64)
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
    totals = np.zeros(2, np.float64)  # loss sum, correct
    first_bad = np.array([info.n_rows], np.int64)
    grad = np.empty(model.layout.size, np.float32)
    with h5py.File(info.path, "r") as f:
        for start in range(lo, hi, chunk_rows):
            stop = min(hi, start + chunk_rows)
            X = np.ascontiguousarray(f["X"][start:stop], np.float32)
            if info.task == "classification":
                y = dataset.labels_as_int32(f["y"][start:stop], info.n_classes)
            else:
                y = np.ascontiguousarray(f["y"][start:stop], np.float32).reshape(stop - start, -1)
            bad = _first_bad_row(info, X, y)
            if bad >= 0:
                first_bad[0] = start + bad
                break
            loss_sum, correct = model.loss_grad(params, X, y, np.float32(0), grad)
            totals[0] += loss_sum
            totals[1] += correct
    comm.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)
    comm.Allreduce(MPI.IN_PLACE, first_bad, op=MPI.MIN)
    if first_bad[0] < info.n_rows:
        raise UserError(f"{_bad_row(info, int(first_bad[0]))}; cannot evaluate", agreed=True)
    loss = totals[0] / info.n_rows
    return loss, (totals[1] / info.n_rows if info.task == "classification" else None)
