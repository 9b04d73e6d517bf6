"""The run's checkpoints: written in step order, in the foreground or by a background thread."""

import json
import math
from pathlib import Path
from typing import Callable

from mpi4py import MPI

from granger_mpi import checkpoint
from granger_mpi.data import partition
from granger_mpi.training.state import TrainState


class Saver:
    """Writes checkpoints of a ``TrainState`` and remembers the newest one written.

    ``async_write`` saves run in a thread on rank 0 from a copy (not with a sharded
    optimizer, nor under ULFM, where rank 0 writes alone with serial HDF5 so that no MPI
    call runs inside HDF5 when a peer dies); one is in flight at most, and each is waited
    for, and its failure raised, before the next save and at the end. ``log`` is the
    writer rank's (``Outputs.log``: a no-op on the other ranks).
    """

    def __init__(self, job, model, info, steps_per_epoch: int, slots: tuple, shard: tuple | None,
                 *, schedule_steps: int, fault_tolerant: bool, log: Callable[[str], None],
                 fail_write_at: int | None = None):
        ckpt = job.checkpoint
        self.run_dir = job.output.run_dir
        self.model = model
        self.per_epoch, self.slots, self.shard = steps_per_epoch, slots, shard
        self.background_allowed = ckpt.async_write and not (shard is not None or fault_tolerant)
        self.parallel_from_bytes = math.inf if fault_tolerant else ckpt.parallel_write_from_mib * 2**20
        self.save_args = dict(job_json=job.to_json(), seed=job.train.seed, keep_last=ckpt.keep_last,
                              extra_attrs={"n_rows": info.n_rows, "partition_rule": partition.RULE,
                                           "partition_window": info.window,
                                           "schedule_steps": schedule_steps,
                                           "dataset": json.dumps(info.fingerprint)},
                              verify_after_write=ckpt.verify_after_write)
        self.log = log
        self.fail_write_at = fail_write_at  # fault injection: this step's save fails, disk full
        self.newest: Path | None = None     # the last checkpoint written
        self._writer = checkpoint.AsyncSaver()
        self._store = checkpoint.store(self.run_dir)

    def save(self, comm: MPI.Comm, state: TrainState, *, on_written=None, background=False) -> None:
        """Collective: a checkpoint of ``state`` at its step (``on_written``: fault injection)."""
        self.finish_background(comm)    # one in flight at most, published in step order
        snapshot = state.snapshot(self.per_epoch, self.slots, self.shard)
        save_args = dict(self.save_args, fail_write=state.step == self.fail_write_at)
        if background and self.background_allowed:
            if on_written is not None:
                on_written()
            self._writer.start(comm, self.run_dir, self.model, snapshot, **save_args)
            return
        self.newest = checkpoint.save(comm, self.run_dir, self.model, snapshot, on_written=on_written,
                                      parallel_from_bytes=self.parallel_from_bytes, **save_args)
        self.log(f"checkpoint {self.newest} (step {state.step})")

    def finish_background(self, comm: MPI.Comm) -> None:
        """Collective: wait for the checkpoint being written in the background, if any."""
        step = self._writer.step
        path = self._writer.wait(comm)
        if path is not None:
            self.newest = path
            self.log(f"checkpoint {path} (step {step}, written in the background)")

    def close(self) -> None:
        """The run's saves are over: wait for old checkpoints to be deleted, end the thread."""
        self._store.close()
