"""What a run records and prints: metrics sinks, the progress line, events, the final model
and the completion record. Only the writer rank (rank 0 of the current communicator)
writes; on the others every call keeps only what a new writer would need, so the loop has
no rank branches.

Every rank keeps the step records (each rank knows every step's loss and accuracy: they
travel in the step's exchange) until it knows that the writer has flushed them: after a
rank failure the new writer writes what the old one had not. The file sinks skip steps
they hold already, so ``metrics.h5`` and ``metrics.jsonl`` hold every step exactly once.
Records are tagged with the run id and generation (failures survived). Live reporters
(HTTP, a user's) get a step only once no roll-back can undo it (a later step's exchange
completed), in the files' order.
"""

import time
import uuid
from typing import Callable

import numpy as np
from mpi4py import MPI

from granger_mpi import rundir
from granger_mpi.errors import WriteError, describe_io_error
from granger_mpi.model import modelfile
from granger_mpi.observe import metrics, reporters, status
from granger_mpi.mpi.runtime import agree, bcast_text


class Outputs:
    """The writer rank's sinks (``metrics.h5``, JSON lines; HTTP and a user's reporters,
    live), progress line and log; the same calls on every rank."""

    def __init__(self, comm: MPI.Comm, job, *, total_steps: int, log: Callable[[str], None]):
        self.job = job
        self.run = rundir.RunDir(job.output.run_dir)
        self.total_steps = total_steps
        self._log = log
        self.writer = comm.Get_rank() == 0
        self.files = self.live = None
        self.progress = None
        self.run_id = ""
        self.generation = 0            # failures survived: a tag of the live records
        self.kept: list[dict] = []     # step records the writer may not have flushed yet
        self.next_step = 0             # the step the next record is for: earlier ones are held
        self._kept_from = 0            # the first step of the flush before last
        self._since_flush = 0
        self._live_queue: list[tuple] = []   # (kind, record) for the live reporters, in order
        self._pending_event = None     # a recovery waiting for its first completed step

    def log(self, message: str) -> None:
        if self.writer:
            self._log(message)

    def open(self, comm: MPI.Comm, *, world_size: int, resume_step: int | None, start_step: int) -> None:
        """Collective: the job file as run and the sinks; a user's reporter that fails to open
        stops every rank."""
        self.run_id = bcast_text(comm, uuid.uuid4().hex if comm.Get_rank() == 0 else "", 0)

        def open_sinks():
            if self.writer:
                try:
                    self.run.job.write_text(self.job.text)
                except OSError as exc:
                    raise WriteError(f"cannot write {self.run.job}: {describe_io_error(exc)}") from None
                files = metrics.open_sinks(self.run.path, self.job,
                                           {"job": self.job.to_json(), "world_size": world_size},
                                           resume_step, live=False, log=self._log)
                try:
                    return files, reporters.Reporters(reporters.live_sinks(self.run.path, self.job))
                except BaseException:
                    files.close()
                    raise
            return None, None
        self.files, self.live = agree(comm, open_sinks)
        self._kept_from = self.next_step = start_step
        if self.writer:
            self.progress = metrics.Progress(self.total_steps - start_step,
                                             self.job.output.progress_interval_s, self._log)

    def step(self, record: dict, *, since_start: int, epoch: int, loss: float, accuracy: float | None,
             samples: int, detail: Callable[[], str], validated: bool = False) -> None:
        """A completed step: its metrics record and, when due (always after a validation),
        the progress line."""
        step_index = record["step"]
        if step_index < self.next_step:    # recorded before a recovery came back to it
            return
        self.next_step = step_index + 1
        record = self._tagged(record)
        self.kept.append(record)
        if self.writer:
            self.files.step(record)
            self._deliver(before=step_index)   # this step's exchange confirms every earlier one
            self._live_queue.append(("step", record))
            validation = None
            if validated:
                val_accuracy = record["val_accuracy"]
                validation = (record["val_loss"], None if np.isnan(val_accuracy) else val_accuracy)
            self.progress.update(since_start, epoch, self.job.train.epochs, loss, accuracy, samples,
                                 force=step_index + 1 == self.total_steps, detail=detail(),
                                 validation=validation)
            if self._pending_event is not None:
                event, self._pending_event = self._pending_event, None
                event["first_step_s"] = time.time() - event["time"]
                self._event(event)
                self._log(f"first step after the failure completed {event['first_step_s']:.3f} s "
                          f"after it was detected")
        else:
            self._pending_event = None
        self._since_flush += 1
        if self._since_flush >= self.job.output.metrics_flush_steps:
            self.flush()

    def _tagged(self, record: dict) -> dict:
        return {**record, "run_id": self.run_id, "generation": self.generation}

    def _deliver(self, before: int) -> None:
        """Hand the live reporters, in order, the queued records of steps before ``before``."""
        while self._live_queue and self._live_queue[0][1]["step"] < before:
            kind, record = self._live_queue.pop(0)
            getattr(self.live, kind)(record)

    def _event(self, event: dict) -> None:
        event = self._tagged(event)
        self.files.event(event)
        self._live_queue.append(("event", event))

    def timings(self, step_index: int, window: dict | None) -> None:
        """The per-rank time split of a window ending at ``step_index`` (gathered on the
        writer; None elsewhere)."""
        if self.writer and window is not None:
            row = self._tagged({"step": step_index, **window})
            self.files.timings(row)
            self._live_queue.append(("timings", row))

    def flush(self) -> None:
        """On the writer, every sink; on every rank, the records kept: this rank's last
        flush came after the writer's (a step's exchange lies between), so what came before
        the last one is written, whichever rank writes next."""
        if self.writer and self.files is not None:
            self.files.flush()
            self.live.flush()
        self.kept = [record for record in self.kept if record["step"] >= self._kept_from]
        self._kept_from = self.kept[-1]["step"] + 1 if self.kept else self._kept_from
        self._since_flush = 0

    def close(self) -> None:
        """The end of the run: every kept record is final."""
        if self.writer and self.files is not None:
            try:
                self._deliver(before=self.total_steps + 1)
            finally:
                sinks, self.files, self.live = (self.files, self.live), None, None
                for group in sinks:
                    group.close()

    def handover(self) -> dict:
        """What a spare that takes a place needs to go on where this rank is (JSON)."""
        return dict(kept=[{key: _plain(value) for key, value in record.items()} for record in self.kept],
                    kept_from=self._kept_from, since_flush=self._since_flush,
                    generation=self.generation, next_step=self.next_step)

    def adopt(self, handover: dict) -> None:
        """On a spare that takes a place: the records and counters of ``handover``."""
        self.kept = handover["kept"]
        self._kept_from, self._since_flush = handover["kept_from"], handover["since_flush"]
        self.generation, self.next_step = handover["generation"], handover["next_step"]

    def failure(self, comm: MPI.Comm, recovered, *, where: str, error: str, lost_at: int,
                entered: float) -> None:
        """After a recovery: records past the agreed step dropped; the writer (the same or a
        new one) reports the failure and reopens the files cut back to the agreed step, then
        writes the kept records they lack. A new writer's live reporters get the confirmed
        kept records again (at least once across a writer's death)."""
        new_writer = comm.Get_rank() == 0 and not self.writer
        self.writer = comm.Get_rank() == 0
        self.generation += 1
        self.kept = [record for record in self.kept if record["step"] < recovered.step]
        self.next_step = min(self.next_step, recovered.step)
        size = comm.Get_size()
        if self.writer:
            status.mark_failed(self.run.path, recovered.gone, f"lost at step {lost_at} ({where})", lost_at)
            spares = "".join(f"; spare world rank {spare} takes the place of world rank {dead}"
                             for spare, dead in sorted(recovered.replaced.items()))
            transfer = (f", state sent to the spare(s) in {recovered.split['transfer_s']:.3f} s"
                        if recovered.replaced else "")
            self._log(f"rank failure at step {lost_at} during {where} ({error}): "
                      f"{len(recovered.gone)} rank(s) lost (world ranks {recovered.gone}){spares}; "
                      f"{size} continue from step {recovered.step} (recovery {recovered.seconds:.3f} s"
                      f"{transfer})")
            if self.files is not None:
                self.files.close()
            self.files = metrics.open_sinks(self.run.path, self.job, None, recovered.step,
                                            live=False, log=self._log)
            if new_writer:
                self.live = reporters.Reporters(reporters.live_sinks(self.run.path, self.job))
                self._live_queue = [("step", record) for record in self.kept]
                self.progress = metrics.Progress(self.total_steps - recovered.step,
                                                 self.job.output.progress_interval_s, self._log)
            for record in self.kept:
                self.files.step(record)    # those it holds are skipped
            self._live_queue = [item for item in self._live_queue if item[1]["step"] < recovered.step]
            self._deliver(before=recovered.step)
            self.files.flush()
        self._pending_event = dict(time=recovered.detected, step=recovered.step,
                                   kind=f"rank failure ({where})", ranks_lost=len(recovered.gone),
                                   world_size=size, spares_used=len(recovered.replaced),
                                   detect_s=recovered.detected - entered, recovery_s=recovered.seconds,
                                   **recovered.split)

    def final_model(self, model, params: np.ndarray, *, steps: int, world_size: int) -> None:
        """``model.h5``."""
        if self.writer:
            modelfile.save(self.run.model, model, params,
                           attrs={"job": self.job.to_json(), "step": steps, "world_size": world_size})

    def completion(self, *, steps: int, world_size: int, lost: list, test_scores: tuple) -> None:
        """The completion record that the supervisor trusts: last of a run's outputs."""
        if self.writer:
            test_loss, test_accuracy = test_scores
            self.run.write_completion({"steps": steps, "world_size": world_size, "ranks_lost": len(lost),
                                       "lost_world_ranks": lost, "model": str(self.run.model),
                                       "test_loss": test_loss, "test_accuracy": test_accuracy,
                                       "finished_at": time.time()})


def _plain(value):
    """A record's value as JSON holds it (numpy scalars as Python numbers)."""
    return value.item() if isinstance(value, np.generic) else value
