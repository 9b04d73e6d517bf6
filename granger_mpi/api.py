"""The public Python API: what the CLI, the benchmark scripts and the tests call.

```
import granger_mpi as g
from mpi4py import MPI
summary = g.train(MPI.COMM_WORLD, g.load_job("jobs/demo.toml"), overwrite=True)
```

``train`` is collective over ``comm`` and never exits the process: the exit code is in the
``Summary`` it returns, for the caller to use. Bad input raises ``errors.UserError`` on every
rank (its ``exit_code`` is 2, or 1 for an output that could not be written).
"""

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mpi4py import MPI

from granger_mpi import config, rundir
from granger_mpi.data import dataset
from granger_mpi.model import modelfile, predict as predictions
from granger_mpi.mpi import threads
from granger_mpi.observe import status
from granger_mpi.errors import EXIT_OK, EXIT_RANKS_LOST, EXIT_STOPPED, UserError
from granger_mpi.mpi.runtime import agree
from granger_mpi.training import async_sgd, setup, spares
from granger_mpi.training.evaluation import evaluate as evaluate_params
from granger_mpi.training.result import TrainResult
from granger_mpi.training.setup import Hooks
from granger_mpi.training.trainer import Trainer, rows_trained, total_steps

COMPLETED, STOPPED, PAST_FAULT_LIMITS = "completed", "stopped", "past_fault_limits"


@dataclass(frozen=True)
class Summary:
    """How a run ended; ``RUN_DIR/summary.json`` holds the same keys (docs/architecture.md)."""

    outcome: str                  # "completed", "stopped" (on request), "past_fault_limits"
    exit_code: int                # what the command line exits with: 0, 3 or 5
    steps: int                    # steps completed
    seconds: float                # the whole call, start-up and test evaluation included
    train_seconds: float          # the training loop (from the first batch in hand) and its final checkpoint
    samples_per_s: float          # rows of the steps trained, per train second
    final_loss: float             # of the last step's global batch
    final_accuracy: float | None  # of the last step's global batch (classification)
    test_loss: float | None       # on [data].test_path, when given and the run completed
    test_accuracy: float | None
    world_size: int               # ranks at the end
    ranks_lost: int
    checkpoint: str | None        # the newest checkpoint written
    run_dir: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def load_job(path: str | Path, run_dir: str | Path | None = None) -> config.JobConfig:
    """A job file, checked (``UserError`` names a bad key); ``run_dir`` overrides [output]."""
    return config.load(path, run_dir)


def train(comm: MPI.Comm, job: config.JobConfig, *, resume: str | Path | None = None,
          overwrite: bool = False, log: Callable[[str], None] = print, hooks: Hooks = Hooks(),
          abort: Callable[[int], None] | None = None) -> Summary:
    """Train ``job`` on the ranks of ``comm``; collective. Returns the same ``Summary`` on every
    rank; rank 0 of the communicator the run ended on writes ``RUN_DIR/summary.json``.

    ``resume``: "auto" (the newest checkpoint that verifies) or a checkpoint path.
    ``overwrite``: replace an earlier run in the run directory. ``log``: where rank 0's lines
    go. ``hooks``: planned failures and a row log (tests, demos). ``abort(code)``: how the
    hang watchdog ends the whole job (default: ``Abort`` on the world communicator).
    """
    started = time.perf_counter()
    if not MPI.Is_initialized():
        MPI.Init_thread()
    comm = comm.Dup()
    fault = job.fault
    watch = status.RankStatus(job.output.run_dir, comm.Get_rank(), comm.Get_size(), "starting",
                              interval_s=fault.status_interval_s, step_timeout_s=fault.step_timeout_s,
                              slow_timeout_s=fault.checkpoint_timeout_s,
                              startup_timeout_s=fault.startup_timeout_s,
                              finish_timeout_s=fault.finish_timeout_s,
                              abort=abort or MPI.COMM_WORLD.Abort)
    watch.set(status.STARTING, note="checking the job's inputs")
    watch.watch()
    try:
        info, model = setup.prepare(comm, job, overwrite=overwrite, resume=resume)
        if overwrite and resume is None:
            setup.discard_previous_run(comm, job)
        spare = comm.Get_rank() in spares.Roles.initial(comm.Get_size(), fault.spares).spares
        n_threads = threads.configure(comm, job.train.threads_per_rank, spare=spare)
        if job.train.strategy == "async":
            if resume is not None:
                raise UserError("--resume: [train].strategy = 'async' writes no checkpoints", agreed=True)
            watch.close(note="asynchronous training: not watched")
            result, final = async_sgd.train(comm, job, info, model, log=log), comm
            result.samples = rows_trained(info, job, 0, total_steps(job, info))   # every step, all workers
        else:
            trainer = Trainer(comm, job, info, model, resume=resume, n_threads=n_threads, log=log,
                              hooks=hooks, watch=watch)
            result, final = trainer.run(), trainer.comm
    finally:
        if watch.state == status.STARTING:    # the start-up failed: end the watch
            watch.close(status.FAILED, note=f"start-up failed while {watch.note}")
    summary = _summary(result, job, time.perf_counter() - started)
    if final is not None and final.Get_rank() == 0:    # None: a spare that was not needed
        rundir.write_json_atomically(rundir.RunDir(job.output.run_dir).summary, summary.to_json())
        _log_end(log, result, job)
    if not result.ranks_lost:     # after a failure, freeing can hang on a broken communicator
        if final is not None and final != comm:
            final.Free()
        comm.Free()
    return summary


def _summary(result: TrainResult, job, seconds: float) -> Summary:
    outcome, code = COMPLETED, EXIT_OK
    if result.limit_reason:
        outcome, code = PAST_FAULT_LIMITS, EXIT_RANKS_LOST
    elif result.stopped:
        outcome, code = STOPPED, EXIT_STOPPED
    return Summary(outcome, code, result.steps, seconds, result.seconds,
                   result.samples / max(result.seconds, 1e-12), result.final_loss, result.final_accuracy,
                   _plain(result.test_loss), _plain(result.test_accuracy), result.world_size, result.ranks_lost,
                   None if result.checkpoint is None else str(result.checkpoint), str(job.output.run_dir))


def _log_end(log, result: TrainResult, job) -> None:
    """The closing lines of a completed run (scripts read the ``done:`` line)."""
    if result.stopped:
        return
    acc = "" if result.final_accuracy is None else f", accuracy {100 * result.final_accuracy:.2f}% (last batch)"
    log(f"done: {result.steps} steps in {result.seconds:.2f} s, loss {result.final_loss:.4f}{acc}")
    if result.test_loss is not None:
        test_acc = "" if result.test_accuracy is None else f", accuracy {100 * result.test_accuracy:.2f}%"
        log(f"test set {job.data.test_path}: loss {result.test_loss:.6f}{test_acc}")
    log(f"model:   {result.model_path}\nmetrics: {result.metrics_path}")


def _load_model(comm: MPI.Comm, model_path, check):
    def load():
        model, params, _ = modelfile.load(model_path)
        return model, params, check(model)
    return agree(comm, load)


def evaluate(comm: MPI.Comm, model_path: str | Path, data_path: str | Path) -> tuple[float, float | None]:
    """Mean loss and accuracy (None for regression) of a model file or checkpoint on a
    dataset; collective over ``comm``."""
    def fits(model):
        info = dataset.open_info(data_path)
        problem = model.fits(info)
        if problem:
            raise UserError(f"{problem}: {model_path}")
        return info
    model, params, info = _load_model(comm, model_path, fits)
    return evaluate_params(comm, model, params, info)


def predict(comm: MPI.Comm, model_path: str | Path, data_path: str | Path, out_path: str | Path) -> int:
    """Predictions of a model file or checkpoint for every row of ``data_path``, written to
    ``out_path`` (``/outputs``, and ``/labels``, ``/probabilities`` for classification);
    collective over ``comm``. Returns the number of rows."""
    out_path = Path(out_path)

    def check(model):
        predictions.check_features(data_path, model)
        if not out_path.parent.is_dir():
            raise UserError(f"output directory {out_path.parent} does not exist")
        if out_path.resolve() in (Path(model_path).resolve(), Path(data_path).resolve()):
            raise UserError(f"output {out_path} would overwrite an input")
    model, params, _ = _load_model(comm, model_path, check)
    return predictions.write(comm, model, params, data_path, out_path, source=model_path)


def _plain(value):
    """A numpy scalar as a Python float (JSON), None as it is."""
    return None if value is None else float(value)
