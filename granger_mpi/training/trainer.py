"""``Trainer``: the synchronous data-parallel loop, assembled from the training layer's parts.

Collective over its communicator. Parameters stay bitwise identical on every rank
(checked at the end); the same job at the same world size gives bitwise identical
results, also when it is stopped and resumed. After a rank failure (ULFM) every survivor
goes on from one agreed place (docs/architecture.md, "Recovery"), and a spare rank, if the
job has one left, takes the dead rank's place (``spares``).
"""

import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
from mpi4py import MPI

from granger_mpi import checkpoint, collectives, faults
from granger_mpi.collectives import overlap
from granger_mpi.data import dataset, integrity, partition
from granger_mpi.model import optimizer, zero
from granger_mpi.observe import status, timing, trace
from granger_mpi.errors import UserError
from granger_mpi.mpi import threads
from granger_mpi.mpi.runtime import agree, bcast_text, gather_text
from granger_mpi.training import setup, spares
from granger_mpi.training.evaluation import check_replicas_identical, evaluate, report_bad_row
from granger_mpi.training.outputs import Outputs
from granger_mpi.training.recovery import NO_PLACE, NoRecovery, UlfmRecovery, hosts, past_limits, split_training
from granger_mpi.training.requests import RequestSource
from granger_mpi.training.result import TrainResult
from granger_mpi.training.saving import Saver
from granger_mpi.training.state import TrainState
from granger_mpi.training.step import BAD, N_STATS, SAVE, STOP, StepRunner
from granger_mpi.mpi.ulfm import rank_failures, RankFailure

# The phases of a rank's place in the run, in order, after ``state.step`` steps: the step's
# update applied; its after-step work (checkpoint, stop, timing report) done; at the end,
# the final checkpoint written; ``model.h5``, test score and the agreed end done.
APPLIED, READY, SAVED, ENDED = range(4)


def total_steps(job, info) -> int:
    """The steps a job trains for: its epochs, or ``max_steps`` if fewer."""
    steps = partition.steps_per_epoch(info.n_rows, job.train.global_batch) * job.train.epochs
    return steps if job.train.max_steps is None else min(steps, job.train.max_steps)


def rows_trained(info, job, start: int, end: int) -> int:
    """Rows in the global batches of steps ``start`` to ``end`` (an epoch's last may be short)."""
    batch = job.train.global_batch
    in_epoch = np.arange(start, end) % partition.steps_per_epoch(info.n_rows, batch)
    return int(np.minimum(batch, info.n_rows - in_epoch * batch).sum())


class Trainer:
    """One run of a job on ``comm``: ``Trainer(...).run()``; collective. With
    ``[fault].spares = S``, the last S ranks of ``comm`` are spares: they wait, and ``comm``
    is the training communicator only on the others (None on a spare)."""

    def __init__(self, comm: MPI.Comm, job, info, model, *, resume=None, n_threads: int = 1,
                 log: Callable[[str], None] = print, hooks: setup.Hooks = setup.Hooks(),
                 watch: status.RankStatus | None = None, abort: Callable[[int], None] | None = None):
        self.comm, self.job, self.info, self.model = comm, job, info, model
        self.ident = comm.Get_rank()      # the world rank: it names this process in the run
        self.n_threads, self.hooks = n_threads, hooks
        self.per_epoch = partition.steps_per_epoch(info.n_rows, job.train.global_batch)
        self.total_steps = total_steps(job, info)
        self.run_dir = job.output.run_dir
        n = model.layout.size
        sharded = job.train.shard_optimizer
        self.shard = zero.shard_bounds(n, n + N_STATS, comm.Get_rank(), comm.Get_size()) if sharded else None
        self.opt = optimizer.Optimizer(job.optimizer, n, total_steps=self.total_steps,
                                       global_batch=job.train.global_batch, shard=self.shard)
        fault = job.fault
        self.status = watch or status.RankStatus(
            self.run_dir, comm.Get_rank(), comm.Get_size(), "starting",
            interval_s=fault.status_interval_s, step_timeout_s=fault.step_timeout_s,
            slow_timeout_s=fault.checkpoint_timeout_s, startup_timeout_s=fault.startup_timeout_s,
            finish_timeout_s=fault.finish_timeout_s,
            abort=abort or comm.Abort)
        self.status.watch()
        self._starting("compiling the kernels")
        setup.warm_kernels(comm, model, info, self.opt)
        self._starting("finding and reading the checkpoint to resume from")
        params, opt_state, self.start_step, self.source = self._initial_state(resume, log)
        self._starting("probing ULFM")
        fault_tolerant = self._fault_mode(log)
        self.status.mode = "ulfm" if fault_tolerant else "restart"
        self._starting("setting up the exchange")
        self.state = TrainState(params, opt_state, self.start_step, rollback=fault_tolerant)
        roles = spares.Roles.initial(comm.Get_size(), fault.spares)
        self.recovery = (UlfmRecovery if fault_tolerant else NoRecovery)(comm, roles)
        if fault.spares:
            self.comm = split_training(comm, roles, self.recovery.member_idents)
        self.has_state = self.comm is not None   # a spare gets it when it takes a place
        self.threads_of = np.empty(comm.Get_size(), np.int64)   # by world rank: a spare takes its place's
        comm.Allgather(np.array([n_threads], np.int64), self.threads_of)
        self.runner = StepRunner(self.comm, model, info, self.opt, micro_batches=job.train.accumulation_steps,
                                 sharded=sharded, shared_memory=not fault_tolerant,
                                 ranks_per_node=job.collectives.ranks_per_node,
                                 bucket_bytes=self._bucket_bytes(comm),
                                 overlapped=self._overlapped(),
                                 compression=job.collectives.compression)
        self._connect()
        self.hosts = hosts(comm)
        self.world_size = len(self.hosts)
        if comm.Get_rank() == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            status.clear(self.run_dir, comm.Get_size())
        comm.Barrier()
        out = job.output
        self.timeline = trace.Timeline(out.trace_first_step - 1, out.trace_steps) if out.trace_steps else None
        self.injector = faults.Injector(hooks.injections, self.ident)
        self.outputs = Outputs(comm, job, total_steps=self.total_steps, log=log)
        self.policy = checkpoint.CheckpointPolicy(job.checkpoint, self.total_steps)
        self.requests = RequestSource(self.policy, self.outputs.run.stop, watcher=comm.Get_rank() == 0)
        self.saver = Saver(job, model, info, self.per_epoch, self.opt.slots, self.shard,
                           schedule_steps=self.total_steps, fault_tolerant=fault_tolerant, log=self.outputs.log,
                           fail_write_at=hooks.checkpoint_write_fails_at)
        self.timer = timing.PhaseTimer()
        self.stream = self.batches = self.row_log = None
        self.step_index = self.start_step - 1     # the step being worked on
        self.loss, self.accuracy = float("nan"), None
        self.pending: dict | None = None  # the step record of the step last applied
        # Where this rank is: (state.step, phase); a recovery agrees on the earliest.
        self.phase = READY
        self.requested = (False, False)   # the save and stop flags of the step last applied
        self.where = "the start of training"   # what a rank failure interrupts, for messages
        self.stopped, self.recovered = False, False
        self.limit: str | None = None     # the [fault] limit passed, which ends the run
        self.test_scores = (None, None)
        # The training loop's seconds run from the first batch in hand (the data loaded, as a
        # peer's preloaded tensors) to the end of training with its final checkpoint; the test
        # score and model.h5 come after.
        self.loop_started = self.loop_ended = None
        self.validation = (dataset.open_info(job.data.validation_path, job.data.allow_external_storage)
                           if job.data.validation_path is not None else None)
        self.released = None              # on a spare never used: how the run ended, and its steps

    @property
    def training_size(self) -> int:
        return len(self.recovery.idents)

    def _starting(self, phase: str) -> None:
        """The start-up phase under way: watched (``[fault].startup_timeout_s``), and shown."""
        self.status.set(status.STARTING, note=phase)

    def _initial_state(self, resume, log):
        """``(params, optimizer state, step, checkpoint)``: new, or read from a checkpoint."""
        comm, job = self.comm, self.job
        params = self.model.init_params(job.train.seed)
        source = setup.find_resume(comm, job, resume, log) if resume is not None else None
        if source is None:
            return params, self.opt.state, 0, None

        def load():
            loaded, attrs = checkpoint.read(source, self.model, self.opt.slots, self.shard)
            setup.check_compatible(source, attrs, job, self.info, self.total_steps)
            return loaded, attrs
        loaded, attrs = agree(comm, load)
        if comm.Get_rank() == 0:
            log(f"resuming from {source}: step {loaded.step} (epoch {loaded.epoch}, step "
                f"{loaded.step_in_epoch}), saved by {int(attrs['world_size'])} rank(s)")
        return loaded.params, self.opt.adopt(loaded.optimizer_state), loaded.step, source

    def _fault_mode(self, log) -> bool:
        """Whether this run survives rank failures (ULFM); the algorithm must allow it."""
        on = setup.fault_mode(self.comm, self.job, log)
        if on and self.shard is not None:    # a dead rank's shard is gone: only a restart brings it back
            on = False
            if self.comm.Get_rank() == 0:
                log("fault tolerance: restart from checkpoints ([train].shard_optimizer)")
        if self.job.fault.spares and not on:
            raise UserError(f"[fault].spares = {self.job.fault.spares} needs ULFM, and this run "
                            f"restarts from checkpoints instead (see the 'fault tolerance' line); "
                            f"launch with granger-mpi run, or remove [fault].spares", agreed=True)
        algorithm = self.job.collectives.algorithm
        if on and algorithm not in collectives.FAULT_TOLERANT + ("auto",):
            raise UserError(f"[collectives].algorithm = {algorithm!r} uses shared-memory windows, "
                            f"which ULFM cannot repair after a failure; use one of "
                            f"{', '.join(collectives.FAULT_TOLERANT)} or auto, or [fault].mode = "
                            f"'restart'", agreed=True)
        return on

    def _bucket_bytes(self, comm: MPI.Comm) -> int:
        """``[collectives].bucket_mb`` in bytes, ``"auto"`` decided (collective over ``comm``)."""
        mb = self.job.collectives.bucket_mb
        if mb == "auto":
            mb = 0 if comm.Get_size() == 1 or collectives.shm.on_one_node(comm) else overlap.AUTO_BUCKET_MB
        return int(mb * 2**20)

    def _overlapped(self) -> bool:
        """``[collectives].overlap``, ``"auto"`` decided on this rank (the same collectives
        run in the same order either way, so ranks may differ)."""
        overlap = self.job.collectives.overlap
        return threads.core_free_for_exchange(self.n_threads) if overlap == "auto" else overlap

    def _connect(self) -> None:
        """Collective over the training ranks: the allreduce, and the exchange's buckets."""
        self.algorithm = self.exchange_plan = self._choose_algorithm()
        if self.comm is not None:
            self.exchange_plan = self.runner.connect(
                self.comm, self.job.collectives.algorithm,
                collectives.FAULT_TOLERANT if self.recovery.enabled else collectives.auto.CANDIDATES)
            if self.runner.buckets and not self.runner.overlapped and self.job.collectives.overlap:
                self.exchange_plan += (" (no core free for an exchange thread)"
                                       if hasattr(self.model, "loss_grad_by_layer") else
                                       " (the model has no per-layer backward to overlap)")

    def _choose_algorithm(self) -> str:
        """The allreduce to use; under ULFM ``auto`` chooses among the repairable ones
        (collective over the training ranks; a spare chooses when it takes a place)."""
        if self.comm is not None and self.recovery.enabled and self.job.collectives.algorithm == "auto":
            return collectives.auto.choose(self.comm, self.runner.nbytes, collectives.FAULT_TOLERANT)
        return self.job.collectives.algorithm

    def _open_stream(self, start_step: int) -> None:
        if self.stream is not None:
            self.stream.close()
        job = self.job
        self.stream = dataset.BatchStream(
            self.info, job.train.global_batch, job.train.seed, self.comm.Get_size(), self.comm.Get_rank(),
            epochs=job.train.epochs, max_steps=job.train.max_steps, start_step=start_step,
            prefetch_steps=job.data.prefetch_steps,
            memory_budget_bytes=int(job.data.memory_budget_mb * 2**20))
        self.batches = iter(self.stream)

    def _log_data(self) -> None:
        """Collective: which rows each rank holds, and how, into the run's log."""
        lines = gather_text(self.comm, self.stream.describe())
        info = self.info
        self.outputs.log(f"data: {info.n_rows:,} rows of {info.row_bytes} bytes in "
                         f"{self.job.train.global_batch} lanes, windows of {info.window} rows, "
                         + ("every read checked against the file's checksums" if info.checksummed
                            else "no checksums (granger-mpi dataset checksum adds them)"))
        for rank, line in enumerate(lines):
            self.outputs.log(f"data: rank {rank}: {line}")

    def run(self) -> TrainResult:
        """Train to the end, a requested stop or the [fault] limits; collective."""
        self.status.start()
        try:
            self._starting("opening the metrics files and reporters")
            self.outputs.open(self.recovery.members, world_size=self.training_size,
                              resume_step=self.start_step if self.source else None,
                              start_step=self.start_step)
            self._log_start()
            self.policy.saved()
            if self.has_state:
                self._starting("opening the data")
                self._open_stream(self.start_step)
                self._log_data()
                self.row_log = self.hooks.open_row_log(self.ident, os.getpid())
            else:
                self._idle()
            outcome = spares.FAILED
            entered = time.perf_counter()
            try:
                with self.requests:
                    self.timer.start()
                    self._converge()
                outcome = (spares.PAST_LIMITS if self.limit else spares.STOPPED if self.stopped
                           else spares.COMPLETED)
            finally:
                if self.comm is not None:
                    spares.release(self.recovery.members, self.recovery.ranks_of(self.recovery.roles.spares),
                                   outcome, self.state.step)
                if self.stream is not None:
                    self.stream.close()
                self.runner.close()
                if self.row_log is not None:
                    self.row_log.close()
                self.outputs.close()
            return self._result((self.loop_ended or time.perf_counter()) - (self.loop_started or entered))
        except BaseException as exc:
            self.status.close(status.FAILED, note=f"{type(exc).__name__}: {exc}"[:200])
            raise

    def _converge(self) -> None:
        """Run on from this rank's place; after a rank failure every survivor goes on from
        the place agreed in the recovery, and nothing is re-run on some ranks only."""
        while True:
            try:
                if self.comm is None:     # a spare: until the run ends or a rank dies
                    self.released = spares.wait(self.recovery.members,
                                                self.recovery.ranks_of(self.recovery.idents))
                    return None
                with rank_failures(self.comm, lambda: self.where):
                    return self._go()
            except RankFailure as failure:
                self._survive(failure)

    def _idle(self) -> None:
        """A spare's wait begins: shown in ``status``; its wall and CPU time are kept."""
        self.idle_since = (time.perf_counter(), time.process_time())
        self.status.set(status.SPARE, note=f"spare for {self.training_size} training rank(s)")

    def _go(self) -> None:
        """From ``self.place`` to the end of the run (collective, on the current communicator)."""
        if self.recovered:     # the first collectives after a recovery
            self.recovered = False
            self._connect()
            check_replicas_identical(self.comm, self.state.params,
                                     "parameters after a rank failure and roll-back")
            if self.state.step < self.total_steps:    # the stream was reopened for the new P
                self._log_data()
        if self.limit:
            return self._stop_past_limits()
        if self.phase == APPLIED:
            self._after_step()
        while self.phase == READY and self.state.step < self.total_steps and not self.stopped:
            self._step()
            self._after_step()
        if self.stopped:
            return None
        if self.phase == READY:
            self.where = "the end of training"
            self.saver.finish_background(self.comm)
            check_replicas_identical(self.comm, self.state.params, "parameters at the end of training")
            done = self.state.step
            if self.policy.due_at_end(done, self.start_step, self.saver.newest, checkpoint.file_name):
                self._save(self.injector.checkpoint_hook(done))
            self.phase = SAVED
            self.loop_ended = time.perf_counter()
        if self.phase == SAVED:
            self._write_results()
            self.phase = ENDED

    def _step(self) -> None:
        """Compute, exchange and apply step ``state.step``; ``phase`` is then ``APPLIED``."""
        timer, runner, state, injector = self.timer, self.runner, self.state, self.injector
        timer.lap(timing.OTHER)    # the previous step's bookkeeping
        try:
            epoch, step, batch_len, rows, X, y = next(self.batches)
            damage = None
        except integrity.DamagedData as exc:   # agreed below, like a bad row
            damage, (epoch, step, batch_len, rows), X, y = exc, exc.step_item, None, None
        timer.lap(timing.DATA)
        if self.loop_started is None:
            self.loop_started = time.perf_counter()
        self.step_index = step_index = epoch * self.per_epoch + step
        self._trace(step_index)
        started = time.perf_counter()
        self.status.set(status.TRAINING, step_index)
        injector.at_compute(step_index)
        self._log_rows(epoch, step, rows)
        runner.request(*self.requests.take())
        injector.arm_allreduce(step_index, self.algorithm)    # with overlap, it starts in compute
        bad = runner.compute(state.params, rows, X, y, batch_len) if damage is None else runner.refuse()
        self.status.set(status.AGGREGATING)
        timer.lap(timing.COMPUTE)
        self.where = f"the allreduce ({self.algorithm})"
        applied = runner.exchange(self.comm, self.algorithm, state.params, step_index)
        timer.lap(timing.COMM)
        if runner.flag(BAD):
            report_bad_row(self.comm, self.info, rows[bad] if bad >= 0 else None, epoch, step, damage)
        self.requested = runner.flag(SAVE), runner.flag(STOP)
        state.commit()
        grad_norm, lr = applied or runner.apply(state.params, step_index)
        state.step, self.phase = step_index + 1, APPLIED
        timer.lap(timing.COMPUTE)
        timer.steps += 1
        self.pending = self._step_record(epoch, batch_len, grad_norm, lr, started)
        if runner.timeline is not None and step_index in (self.timeline.last, self.total_steps - 1):
            self._write_trace()

    def _trace(self, step_index: int) -> None:
        """Start or go on with the timeline of ``[output].trace_steps`` (collective at its start)."""
        timeline = self.timeline
        if timeline is None or not timeline.covers(step_index):
            self.runner.timeline = None
            return
        if self.runner.timeline is None:
            timeline.begin(self.comm)
            self.runner.timeline = timeline

    def _write_trace(self) -> None:
        """Collective: the timeline into ``RUN_DIR/trace.json``; tracing ends."""
        path = self.run_dir / "trace.json"
        self.where = "writing the timeline"
        self.timeline.write(self.comm, path, self.recovery.idents)
        self.outputs.log(f"timeline of steps {self.timeline.first + 1}..{self.step_index + 1}: {path} "
                         f"(chrome://tracing or ui.perfetto.dev)")
        self.runner.timeline = self.timeline = None

    def _after_step(self) -> None:
        """The validation and the metrics record of step ``state.step - 1``, then the
        checkpoint, stop and timing report due after it, decided from that step's agreed
        flags (so a survivor that redoes this does the same); then ``READY``."""
        done = self.state.step
        self._record(self._validate(done))
        save, stop = self.requested
        if self.policy.due(done, save or stop):
            self.outputs.flush()
            self.timer.lap(timing.OTHER)    # this step's metrics and progress, as in any step
            self.where = "a checkpoint"
            self._save(self.injector.checkpoint_hook(done), background=not stop)
        if stop and done < self.total_steps:
            self.requests.stop_honoured()
            self.stopped = True
        elif done % self.job.output.timing_every_steps == 0 or done == self.total_steps:
            self.where = "a timing report"
            self.injector.at_report(done - 1)
            self.outputs.timings(done - 1, self.timer.gather(self.comm, self.recovery.idents,
                                                              self.world_size))
        self.phase = READY

    def _log_rows(self, epoch: int, step: int, rows: np.ndarray) -> None:
        if self.row_log is not None:   # generation: how many failures this run has survived
            self.row_log.write(f"{epoch} {step} {self.recovery.generation} {' '.join(map(str, rows))}\n")

    def _validate(self, done: int) -> tuple:
        """Collective when due (every ``validate_every_steps`` and after the last step): the
        validation loss and accuracy of the parameters after ``done`` steps; NaNs otherwise."""
        every = self.job.train.validate_every_steps
        if self.validation is None or (done % every and done != self.total_steps):
            return math.nan, math.nan
        self.where = "a validation"
        self.status.set(status.VALIDATING, note=f"validation after step {done}")
        self.injector.at_validation(done - 1)
        loss, accuracy = evaluate(self.comm, self.model, self.state.params, self.validation)
        self.timer.lap(timing.OTHER)
        return loss, math.nan if accuracy is None else accuracy

    def _step_record(self, epoch: int, batch_len: int, grad_norm: float, lr: float, started: float) -> dict:
        """The metrics of the step just applied, kept until ``_record`` hands them on."""
        self.loss, self.accuracy = self.runner.loss_and_accuracy()
        step_time = time.perf_counter() - started
        return dict(step=self.step_index, epoch=epoch, loss=self.loss,
                    accuracy=math.nan if self.accuracy is None else self.accuracy, grad_norm=grad_norm,
                    learning_rate=lr, step_time_s=step_time,
                    samples_per_s=batch_len / max(step_time, 1e-12), samples=batch_len)

    def _record(self, validation: tuple) -> None:
        """The metrics and progress line of the step before ``state.step``, with its
        ``validation``. After a recovery to this place a rank that had recorded it already
        (it has gone on since) records nothing; one that had not (the failure came in the
        validation, or it is a spare with its holder's) records it now."""
        pending = self.pending
        if pending is None or pending["step"] != self.state.step - 1:
            return
        record = {key: value for key, value in pending.items() if key != "samples"}
        record["val_loss"], record["val_accuracy"] = validation
        faults_mode = "ulfm" if self.recovery.enabled else "restart"
        self.outputs.step(
            record, since_start=record["step"] - self.start_step, epoch=record["epoch"],
            loss=record["loss"], accuracy=None if math.isnan(record["accuracy"]) else record["accuracy"],
            samples=pending["samples"], validated=not math.isnan(record["val_loss"]),
            detail=lambda: f"allreduce {collectives.in_use(self.comm, self.runner.nbytes, self.algorithm)} "
                           f"faults {faults_mode}")

    def _save(self, on_written=None, background: bool = False) -> None:
        """Collective: a checkpoint of the state as it is (``on_written``: fault injection)."""
        self.status.set(status.CHECKPOINTING, note=f"checkpoint at step {self.state.step}")
        self.saver.save(self.comm, self.state, on_written=on_written, background=background)
        self.requests.served()
        self.policy.saved()
        self.timer.lap(timing.CHECKPOINT)

    def _survive(self, failure: RankFailure) -> None:
        """After a rank failure: a working communicator, every survivor at the agreed place
        (rolled back one step if this rank was ahead), the rest of the epoch re-split among
        the survivors; in restart mode the failure is raised."""
        self.recovery.admit(failure)
        entered = self.status.since
        self.status.set(status.RECOVERING, note=f"rank failure during {failure.where}")
        self.injector.at_recovery(self.step_index)
        recovered = self.recovery.recover(self.comm, self._place, self._settle)
        self.comm = recovered.comm
        self.recovered = True
        size = self.training_size
        self.status.ranks_alive, self.status.failures = size, len(self.recovery.lost)
        self.limit = self.limit or past_limits(self.job.fault, size, self.recovery.lost, self.hosts)
        if self.comm is None:
            return self._idle()
        self.requests.watcher = self.comm.Get_rank() == 0
        self.outputs.failure(self.comm, recovered, where=failure.where,
                             error=failure.error.Get_error_string().strip(),
                             lost_at=self.step_index, entered=entered)
        if recovered.step < self.total_steps:
            self._open_stream(recovered.step)

    def _place(self) -> tuple:
        """Where this rank is, for a recovery to agree on the earliest: ``(state.step, phase)``."""
        return (self.state.step, self.phase) if self.has_state else NO_PLACE

    def _settle(self, comm: MPI.Comm, place: tuple, replaced: dict) -> None:
        """Collective over the training ranks of a recovery: go to the agreed ``place``
        (rolled back one step if this rank was ahead); the spares that joined receive the
        state from the first rank that holds it, and with it the dead rank's place."""
        step, self.phase = place
        if self.has_state:
            self.state.restore(step)
        holders = np.empty(comm.Get_size(), np.int8)
        comm.Allgather(np.array([self.has_state], np.int8), holders)
        if holders.all():
            return
        root = int(np.argmax(holders))
        comm.Bcast(self.state.params, root=root)
        comm.Bcast(self.state.opt_state, root=root)
        handover = bcast_text(comm, json.dumps(self._handover()) if comm.Get_rank() == root else "", root)
        if not self.has_state:
            self._take_over(step, json.loads(handover), self.threads_of[replaced[self.ident]])

    def _handover(self) -> dict:
        """What a spare needs besides the parameters and optimizer state to go on as a
        training rank: the last step's flags and numbers, the newest checkpoint, the kept
        metrics records (it may be the new writer)."""
        newest = self.saver.newest
        return dict(requested=[bool(flag) for flag in self.requested], loss=self.loss, accuracy=self.accuracy,
                    pending=self.pending,
                    newest=None if newest is None else str(newest),
                    since_save=time.perf_counter() - self.policy.last_save,
                    outputs=self.outputs.handover())

    def _take_over(self, step: int, handover: dict, n_threads: int) -> None:
        """On a spare: become a training rank at ``step`` with the state just received."""
        self.state.step, self.step_index = step, step - 1
        self.requested = tuple(handover["requested"])
        self.loss, self.accuracy = handover["loss"], handover["accuracy"]
        self.pending = handover["pending"]
        self.saver.newest = None if handover["newest"] is None else Path(handover["newest"])
        self.policy.last_save = time.perf_counter() - handover["since_save"]
        self.outputs.adopt(handover["outputs"])
        self.n_threads = threads.use(int(n_threads))
        self.row_log = self.hooks.open_row_log(self.ident, os.getpid())
        self.timer.start()
        self.has_state = True

    def _stop_past_limits(self) -> None:
        on_limit = self.job.fault.on_limit
        self.outputs.log(f"stopping (exit code 5): {self.limit}; " + (
            f"saving a checkpoint at step {self.state.step}; continue with --resume auto"
            if on_limit == "stop" else "continue with --resume auto"))
        if on_limit == "stop":
            self.outputs.flush()
            self.where = "the checkpoint before stopping"
            self._save()
        self.phase = ENDED

    def _write_results(self) -> None:
        """The test score, ``model.h5``, the completion record (the writer's), in this order
        so that a test set that fails leaves neither, and the agreement that every survivor
        got here: a writer that died before the end is replaced and all of this done again.
        Watched as ``FINISHING`` (``[fault].finish_timeout_s``), not by the last step's limit."""
        self.status.set(status.FINISHING, self.state.step, note="evaluating, writing model.h5")
        self.saver.close()    # old checkpoints deleted before the completion record
        self.injector.at_end(self.state.step)
        if self.job.data.test_path is not None:
            self.where = "the test evaluation"
            test_info = dataset.open_info(self.job.data.test_path, self.job.data.allow_external_storage)
            self.test_scores = evaluate(self.comm, self.model, self.state.params, test_info)
        self.outputs.final_model(self.model, self.state.params, steps=self.state.step,
                                 world_size=self.comm.Get_size())
        self.outputs.completion(steps=self.state.step, world_size=self.comm.Get_size(),
                                lost=self.recovery.lost, test_scores=self.test_scores)
        self.where = "the end of the run"
        self.recovery.confirm(self.comm)

    def _result(self, seconds: float) -> TrainResult:
        """The outcome of the run."""
        if self.released is not None:
            return self._spare_result(seconds)
        self.saver.finish_background(self.comm)
        self.saver.close()
        done, run = self.state.step, self.outputs.run
        result = TrainResult(done, self.loss, self.accuracy, run.model, run.metrics, seconds=seconds,
                             samples=rows_trained(self.info, self.job, self.start_step, done),
                             checkpoint=self.saver.newest,
                             world_size=self.training_size, ranks_lost=len(self.recovery.lost))
        if self.stopped or self.limit:
            self.status.close(note=self.limit or "stopped on request")
            if self.stopped:
                self.outputs.log(f"stopped on request after step {done}; resume with --resume auto")
            result.stopped, result.limit_reason = True, self.limit
            return result
        result.test_loss, result.test_accuracy = self.test_scores
        self.status.close()
        return result

    def _spare_result(self, seconds: float) -> TrainResult:
        """On a spare that was never needed: the run's end as the training ranks sent it."""
        outcome, done = (int(value) for value in self.released)
        if outcome == spares.FAILED:
            raise SpareReleased("the training ranks ended with an error (rank 0's output says "
                                "which); this spare rank was not needed")
        wall, cpu = (now - then for now, then in zip((time.perf_counter(), time.process_time()),
                                                     self.idle_since))
        self.status.close(note=f"spare, not needed; idle {wall:.2f} s; cpu {cpu:.3f} s")
        run = self.outputs.run
        return TrainResult(done, float("nan"), None, run.model, run.metrics, seconds=seconds,
                           samples=rows_trained(self.info, self.job, self.start_step, done),
                           world_size=self.training_size, ranks_lost=len(self.recovery.lost),
                           stopped=outcome != spares.COMPLETED,
                           limit_reason=(self.limit or "past the [fault] limits")
                           if outcome == spares.PAST_LIMITS else None)

    def _log_start(self) -> None:
        info, model, job = self.info, self.model, self.job
        self.outputs.log(
            f"training {model.kind} {list(model.sizes)} ({model.layout.size:,} parameters) on "
            f"{info.path} ({info.n_rows:,} rows, {info.task}) with {self.training_size} rank(s), "
            f"global batch {job.train.global_batch}, {self.total_steps} steps, allreduce {self.exchange_plan}, "
            f"optimizer {job.optimizer.name}, {self.n_threads} thread(s) per rank (BLAS: "
            f"{threads.blas_in_use()})")
        self.outputs.log(f"optimizer state: {self.opt.state.nbytes:,} bytes per rank" +
                         (f" (sharded over {self.comm.Get_size()} ranks; "
                          f"{len(self.opt.slots) * model.layout.size * 4:,} unsharded)"
                          if self.shard is not None else ""))
        if job.fault.spares:
            self.outputs.log(f"spares: world rank(s) {list(self.recovery.roles.spares)} wait idle and "
                             f"take the place of a training rank that dies")


class SpareReleased(UserError):
    """A spare's end when the training ranks failed: they report why; the spare only exits."""

    exit_code = 1

    def __init__(self, message):
        super().__init__(message, agreed=True)
