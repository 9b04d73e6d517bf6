"""Before a run: checks on every rank, the checkpoint to resume from, the fault mode."""

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

import numpy as np
from mpi4py import MPI

from granger_mpi import checkpoint, rundir
from granger_mpi.data import dataset, partition
from granger_mpi.model import models
from granger_mpi.mpi import ulfm
from granger_mpi.errors import UserError, describe_io_error
from granger_mpi.mpi.runtime import agree, bcast_text
from granger_mpi.training.evaluation import first_bad_row


@dataclass(frozen=True)
class Hooks:
    """What tests and demos plug into a run: planned failures (``faults.Injection``, fired
    where they belong), a checkpoint whose write fails as on a full disk, and a directory
    where each rank logs the rows of every step it starts (``epoch step generation row
    row ...``; ``generation`` counts the failures survived, so that a step redone after a
    roll-back is counted from its newest one: ``row_uses``)."""

    injections: tuple = ()
    row_log_dir: Path | None = None
    checkpoint_write_fails_at: int | None = None    # the save of this step fails as on a full disk

    def open_row_log(self, rank: int, pid: int) -> IO | None:
        if self.row_log_dir is None:
            return None
        # Line-buffered: a rank that is killed must not lose the rows of steps it completed.
        return open(Path(self.row_log_dir) / f"rows-{pid}-rank{rank}.txt", "a", buffering=1)


def row_uses(row_log_dir: Path) -> Counter:
    """``Counter`` of (epoch, row) uses in a row log directory (``Hooks.row_log_dir``); a
    step redone after a roll-back counts only from its newest generation, never twice."""
    steps = {}
    for path in Path(row_log_dir).glob("rows-*.txt"):
        for line in path.read_text().splitlines():
            epoch, step, generation, *rows = map(int, line.split())
            steps.setdefault((epoch, step), []).append((generation, rows))
    uses = Counter()
    for (epoch, _), entries in steps.items():
        newest = max(generation for generation, _ in entries)
        uses.update((epoch, row) for generation, rows in entries if generation == newest for row in rows)
    return uses


def prepare(comm: MPI.Comm, job, overwrite: bool = False, resume: str | Path | None = None):
    """Check everything a run needs, on every rank, before anything is written.

    Collective over ``comm``; raises the same ``UserError`` on all ranks. Returns the
    dataset's ``DatasetInfo`` and the model.
    """
    def check():
        info = dataset.open_info(job.data.path, job.data.allow_external_storage)
        for key, path in (("test_path", job.data.test_path), ("validation_path", job.data.validation_path)):
            if path is None:
                continue
            other = dataset.open_info(path, job.data.allow_external_storage)
            if (other.n_features, other.task, other.n_outputs) != (info.n_features, info.task, info.n_outputs):
                raise UserError(f"[data].{key} {other.path} does not match the training set "
                                f"({other.n_features} features, {other.task}) vs "
                                f"({info.n_features} features, {info.task})")
        try:
            model = models.build(job.model.kind, job.model.hidden, job.model.activation,
                                 info.n_features, info.task, info.n_outputs, job.model.options)
        except ValueError as exc:
            raise UserError(f"[model]: {exc} ({info.path} is {info.task})") from None
        ranks = comm.Get_size() - job.fault.spares
        if ranks < 1:
            raise UserError(f"[fault].spares = {job.fault.spares} leaves no training rank of the "
                            f"{comm.Get_size()} launched; launch P + spares ranks "
                            f"(granger-mpi run -n P --spares S)")
        if job.fault.spares and job.train.shard_optimizer:
            raise UserError("[fault].spares: a sharded optimizer ([train].shard_optimizer) runs "
                            "without ULFM, so spares could never take a place; remove one of them")
        if job.fault.spares and job.fault.mode == "restart":
            raise UserError("[fault].spares needs ULFM, but [fault].mode = 'restart'; use 'auto' "
                            "or 'ulfm', or remove [fault].spares")
        if job.fault.spares and job.train.strategy == "async":
            raise UserError("[fault].spares: [train].strategy = 'async' has no spare ranks; "
                            "remove [fault].spares or use strategy 'sync'")
        if job.train.global_batch < ranks:
            which = f"{ranks} training ranks" if job.fault.spares else f"{ranks} ranks"
            raise UserError(f"[train].global_batch = {job.train.global_batch} is smaller than the "
                            f"{which}; every rank needs at least one row per step")
        run = rundir.RunDir(job.output.run_dir)
        taken = [p.name for p in (run.model, run.metrics) if p.exists()]
        if taken and not overwrite and resume is None:
            raise UserError(f"[output].run_dir {run.path} already holds a run ({', '.join(taken)}); "
                            f"choose another run_dir or pass --overwrite")
        if problem := rundir.unwritable(run.path):
            raise UserError(f"[output].run_dir {run.path} {problem}; nothing was trained")
        return info, model
    return agree(comm, check)


def discard_previous_run(comm: MPI.Comm, job) -> None:
    """Remove an earlier run's checkpoints and STOP file (``--overwrite``), so that a later
    ``--resume auto`` can never pick up a checkpoint of the run this one replaced."""
    run = rundir.RunDir(job.output.run_dir)

    def discard():
        if comm.Get_rank() == 0:
            try:
                checkpoint.discard(run.path)
                run.stop.unlink(missing_ok=True)
                run.complete.unlink(missing_ok=True)
            except OSError as exc:
                raise UserError(f"--overwrite: cannot remove the previous run's files in {run.path} "
                                f"({describe_io_error(exc)}); nothing was trained") from None
    agree(comm, discard)


def warm_kernels(comm: MPI.Comm, model, info, opt) -> None:
    """Compile (or load from cache) the kernels on rank 0 first, then the rest.

    Numba's on-disk cache is not safe against many processes compiling at once.
    """
    def touch():
        X = np.zeros((1, info.n_features), np.float32)
        y = np.zeros(1, np.int32) if info.task == "classification" else np.zeros((1, info.n_targets), np.float32)
        params = model.init_params(0)
        grad = np.empty_like(params)
        model.loss_grad(params, X, y, np.float32(1.0), grad)
        first_bad_row(info, X, y)
        opt.warm()
    if comm.Get_rank() == 0:
        touch()
    comm.Barrier()
    if comm.Get_rank() != 0:
        touch()


def find_resume(comm: MPI.Comm, job, resume, log: Callable[[str], None]) -> Path | None:
    """The checkpoint to resume from: ``"auto"`` (newest that verifies; None when the run
    has none yet) or a path. Collective: rank 0 decides and tells the others."""
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
        if not problems and (kind := checkpoint.kind(resume)) != checkpoint.FORMAT:
            problems = [f"a {kind} file, not a checkpoint: it holds no optimizer state or "
                        f"position to continue from"]
        if problems:
            raise UserError(f"--resume {resume}: {problems[0].removeprefix(f'{resume}: ')}")
        return str(resume)
    text = bcast_text(comm, agree(comm, choose), 0)
    return Path(text) if text else None


def fault_mode(comm: MPI.Comm, job, log: Callable[[str], None]) -> bool:
    """True for ULFM (revoke/shrink/carry on), False for restart; decided by a real probe."""
    works, detail = ulfm.probe()
    flags = np.array([1 if works else 0], np.int64)
    comm.Allreduce(MPI.IN_PLACE, flags, op=MPI.MIN)
    works = bool(flags[0])
    if job.fault.mode == "ulfm" and not works:
        raise UserError(f"[fault].mode = 'ulfm' but ULFM does not work in this job: {detail}",
                        agreed=True)
    on = works and job.fault.mode != "restart"
    if comm.Get_rank() == 0:
        log(f"fault tolerance: {'ULFM (revoke, shrink, carry on)' if on else 'restart from checkpoints'}"
            f"{'' if works or job.fault.mode == 'restart' else ' (' + detail + ')'}")
    return on


def check_compatible(path: Path, attrs, job, info, schedule_steps: int) -> None:
    """Refuse a checkpoint made for another training problem, naming what differs: the
    job's keys that shape the updates, the dataset (its fingerprint), the partition rule,
    and the steps a cosine schedule spans."""
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
    rule = int(attrs.get("partition_rule", 1))
    if rule != partition.RULE:
        raise UserError(f"checkpoint {path} was made under partition rule {rule} (every rank "
                        f"shuffling the whole file), this version uses rule {partition.RULE} (each "
                        f"rank owning lanes of the file): the rows its epoch has left cannot be "
                        f"told; finish that run with the version that started it, or start afresh")
    if "dataset" in attrs:
        saved, now = json.loads(attrs["dataset"]), info.fingerprint
        differs = [k for k in ("sample", "blocks") if k in saved and k in now and saved[k] != now[k]]
        if differs:
            k = differs[0]
            raise UserError(f"checkpoint {path} was made on another dataset than {info.path}: "
                            f"its {k} was {saved[k]!r}, the file's is {now[k]!r}")
    saved_steps = int(attrs.get("schedule_steps", schedule_steps))
    if job.optimizer.schedule == "cosine" and saved_steps != schedule_steps:
        raise UserError(f"checkpoint {path} was made with a cosine schedule over {saved_steps} "
                        f"steps, the job's spans {schedule_steps} ([train].epochs, max_steps): "
                        f"every learning rate after step {int(attrs['step'])} would change")
    if int(attrs.get("partition_window", info.window)) != info.window:
        raise UserError(f"checkpoint {path} was made with windows of {int(attrs['partition_window'])} "
                        f"rows, {info.path} gives {info.window}: its rows are stored differently "
                        f"(another dtype or width), so the epoch's order would change")
