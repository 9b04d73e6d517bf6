"""What a run records and prints: metrics sinks, the progress line, events, the final model
and the completion record. Only the writer rank (rank 0 of the current communicator)
writes; on the others every call is a no-op, so the loop has no rank branches."""

import time
from typing import Callable

import numpy as np
from mpi4py import MPI

from granger_mpi import rundir
from granger_mpi.model import modelfile
from granger_mpi.observe import metrics, status
from granger_mpi.mpi.runtime import agree


def _reopen_sinks(run, job, resume_step, log):
    """The sinks after a failure, cut back to ``resume_step``; if the old rank 0 died while
    writing ``metrics.h5`` and left it unreadable, it is kept aside and a new one started."""
    try:
        return metrics.open_sinks(run.path, job, None, resume_step)
    except (OSError, RuntimeError, KeyError) as exc:
        aside = run.metrics.with_name(f"metrics.damaged-{int(time.time())}.h5")
        run.metrics.replace(aside)
        log(f"metrics file {run.metrics} unreadable after the failure ({exc}); kept as {aside}, "
            f"starting a new one at step {resume_step}")
        return metrics.open_sinks(run.path, job, None, None)


class Outputs:
    """The writer rank's sinks (``metrics.h5``, JSON lines, HTTP, a user's reporters),
    progress line and log; the same calls on every rank."""

    def __init__(self, comm: MPI.Comm, job, *, total_steps: int, log: Callable[[str], None]):
        self.job = job
        self.run = rundir.RunDir(job.output.run_dir)
        self.total_steps = total_steps
        self._log = log
        self.writer = comm.Get_rank() == 0
        self.sinks = None
        self.progress = None
        self._pending_event = None     # a recovery waiting for its first completed step

    def log(self, message: str) -> None:
        if self.writer:
            self._log(message)

    def open(self, comm: MPI.Comm, *, world_size: int, resume_step: int | None, start_step: int) -> None:
        """Collective: the job file as run and the sinks; a user's reporter that fails to open
        stops every rank."""
        def open_sinks():
            if self.writer:
                self.run.job.write_text(self.job.text)
                return metrics.open_sinks(self.run.path, self.job,
                                          {"job": self.job.to_json(), "world_size": world_size}, resume_step)
        self.sinks = agree(comm, open_sinks)
        if self.writer:
            self.progress = metrics.Progress(self.total_steps - start_step,
                                             self.job.output.progress_interval_s, self._log)

    def step(self, record: dict, *, since_start: int, epoch: int, loss: float, accuracy: float | None,
             samples: int, detail: Callable[[], str]) -> None:
        """A completed step: its metrics record and, when due, the progress line."""
        if not self.writer:
            self._pending_event = None
            return
        self.sinks.step(record)
        step_index = record["step"]
        self.progress.update(since_start, epoch, self.job.train.epochs, loss, accuracy, samples,
                             force=step_index + 1 == self.total_steps, detail=detail())
        if self._pending_event is not None:
            event, self._pending_event = self._pending_event, None
            event["first_step_s"] = time.time() - event["time"]
            self.sinks.event(event)
            self._log(f"first step after the failure completed {event['first_step_s']:.3f} s "
                      f"after it was detected")

    def timings(self, step_index: int, window: dict | None) -> None:
        """The per-rank time split of a window ending at ``step_index`` (gathered on the
        writer; None elsewhere)."""
        if self.writer and window is not None:
            self.sinks.timings({"step": step_index, **window})

    def flush(self) -> None:
        if self.sinks is not None:
            self.sinks.flush()

    def close(self) -> None:
        if self.sinks is not None:
            self.sinks.close()
            self.sinks = None

    def failure(self, comm: MPI.Comm, recovered, *, where: str, error: str, old_size: int,
                lost_at: int, entered: float, training: bool) -> None:
        """After a recovery: the new writer reports it, and while training goes on, its sinks
        continue from the agreed step; the event is recorded with the first step after it."""
        self.writer = comm.Get_rank() == 0
        size = comm.Get_size()
        if self.writer:
            status.mark_failed(self.run.path, recovered.gone, f"lost at step {lost_at} ({where})", lost_at)
            self._log(f"rank failure at step {lost_at} during {where} ({error}): "
                      f"{old_size - size} rank(s) lost (world ranks {recovered.gone}); {size} continue "
                      f"from step {recovered.step} (revoke+shrink+agree {recovered.seconds:.3f} s)")
            if training:
                self.close()
                self.sinks = _reopen_sinks(self.run, self.job, recovered.step, self._log)
                self.progress = self.progress or metrics.Progress(
                    self.total_steps - recovered.step, self.job.output.progress_interval_s, self._log)
        self._pending_event = dict(time=recovered.detected, step=recovered.step,
                                   kind=f"rank failure ({where})", ranks_lost=len(recovered.gone),
                                   world_size=size, detect_s=recovered.detected - entered,
                                   recovery_s=recovered.seconds)

    def final_model(self, model, params: np.ndarray, *, steps: int, world_size: int,
                    lost: list) -> None:
        """``model.h5``, then the completion record that the supervisor trusts."""
        if self.writer:
            modelfile.save(self.run.model, model, params,
                           attrs={"job": self.job.to_json(), "step": steps, "world_size": world_size})
            self.run.write_completion({"steps": steps, "world_size": world_size, "ranks_lost": len(lost),
                                       "lost_world_ranks": lost, "model": str(self.run.model),
                                       "finished_at": time.time()})
