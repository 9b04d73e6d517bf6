"""Writing a checkpoint: How a save stays atomic (SCR, PyTorch DCP): the state goes into ``step_XXXXXXXX.h5.tmp``,
each tensor checksummed from memory as it is written (``checksums``), with its manifest;
once closed, rank 0 seals it (``storage.seal``: a CRC32 of the whole file); it is fsynced
(starting as soon as its data is written) and read back, its checksums verified; only then
is it renamed to its final name, ``latest`` pointed at it (the next index is written as
``latest.tmp`` while the fsync runs; both renames made durable by one fsync of the
directory), and checkpoints beyond ``keep_last`` deleted (in the background). A crash at
any point leaves the previous good checkpoint in place; a torn or corrupt file is detected
by its checksums and skipped by ``--resume auto``.

Who writes: a large or sharded state is written by every rank, its rows of every tensor
into the one file opened with the mpio driver (creating datasets and attributes is
collective, the writes independent), and read back by every rank, its share. A small
unsharded state (``[checkpoint].parallel_write_from_mib``) is the same on every rank, and
rank 0 writes, checks and publishes it alone with serial HDF5 while the others wait for
the outcome: a collective open, close and read-back cost more than they share there.
"""

import errno
import json
import os
import threading

import numpy as np

from granger_mpi.checkpoint.format import (FORMAT, NAME, CheckpointError, Snapshot, gather_crcs,
                                           rank_rows, checkpoint_dir, file_name, verify)
from granger_mpi.checkpoint.format import tensors as state_tensors
from granger_mpi.checkpoint.store import store
from granger_mpi.errors import UserError, describe_io_error
from granger_mpi.mpi.runtime import agree, raise_from_root
from granger_mpi.storage import fsync, manifest, seal
from granger_mpi.storage.checksums import CrcPipeline, chunks, combine
from granger_mpi.storage.h5files import create_file, new_dataset, set_attr, write_rows
from granger_mpi.storage.versions import versions_json

# Below this much unsharded state, rank 0 writes the whole file alone with serial HDF5 (the
# state is the same on every rank): a collective open, close and read-back then cost more
# than sharing the writes saves (docs/performance.md, checkpoints).
# ``[checkpoint].parallel_write_from_mib`` sets it per job.
PARALLEL_FROM_BYTES = 64 << 20


def save(comm, run_dir, model, state, *, job_json, seed, keep_last=3, extra_attrs=None,
         verify_after_write=True, on_written=None, parallel_from_bytes=PARALLEL_FROM_BYTES,
         fail_write=False):
    """Write ``state`` as a new checkpoint; collective over ``comm``. Returns its path.

    ``verify_after_write`` reads the file back and checks every checksum before the file
    gets its final name (the checksums are checked on every load either way).

    If any part fails (a full disk, say), every rank raises the same ``UserError``: the
    message and exit code of the ``CheckpointError`` where it failed (``runtime.agree``, or
    rank 0's sent to all); the checkpoints written before are left as they were.
    ``on_written`` is called after this rank's writes, before the file is closed, and
    ``fail_write`` makes the last writing rank's write fail as on a full disk (fault
    injection).

    Who writes: with sharded optimizer state, or at least ``parallel_from_bytes`` of state,
    every rank writes its rows into one file through the mpio driver and reads its share
    back. Otherwise rank 0 writes, verifies and publishes the whole file with serial HDF5
    while the others wait for the outcome. ULFM runs always take the latter (``inf``): when
    a peer died inside parallel HDF5's collective calls, the survivors' HDF5 crashed at its
    next call, even on another file; this way no MPI call runs inside HDF5, and a failure
    surfaces as an MPI error on ``comm`` that the survivors recover from and then save again.
    """
    save_args = dict(job_json=job_json, seed=seed, keep_last=keep_last, extra_attrs=extra_attrs,
                     verify_after_write=verify_after_write, fail_write=fail_write)
    nbytes = state.params.nbytes + state.optimizer_state.nbytes
    if state.optimizer_shard is not None or nbytes >= parallel_from_bytes:
        return _save(comm, run_dir, model, state, on_written=on_written,
                     world_size=comm.Get_size(), **save_args)
    failure = None
    if comm.Get_rank() == 0:
        try:
            _save(None, run_dir, model, state, on_written=on_written,
                  world_size=comm.Get_size(), **save_args)
        except UserError as exc:
            failure = exc
    elif on_written is not None:
        on_written()
    raise_from_root(comm, failure, sequence=state.step)    # the others wait for rank 0's outcome, sleeping
    return checkpoint_dir(run_dir) / file_name(state.step)


def _save(comm, run_dir, model, state, *, job_json, seed, keep_last, extra_attrs,
          verify_after_write, on_written, world_size, fail_write=False):
    """``save`` by every rank of ``comm`` through the mpio driver, or (``comm`` None) by
    this process alone with serial HDF5 and no MPI call (rank 0 for all, and
    ``AsyncSaver``'s thread); ``world_size`` is the number of ranks the state is from."""
    directory = checkpoint_dir(run_dir)
    ckpt = store(run_dir)
    final = directory / file_name(state.step)
    tmp = final.with_name(final.name + ".tmp")
    rank, size = (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())
    tensors = state_tensors(model, state)
    slabs = []   # (dataset path, this rank's slab); sharded optimizer state only
    if state.optimizer_shard is not None:
        slabs = [(f"optimizer/{slot}", state.slot(i)) for i, slot in enumerate(state.optimizer_slots)]

    def prepare():
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            ckpt.wait_for_pruning()
    _agree(comm, prepare)
    attrs = {"format": FORMAT, "format_version": manifest.FORMAT_VERSION, "step": state.step, "epoch": state.epoch,
             "step_in_epoch": state.step_in_epoch, "world_size": world_size, "writers": size,
             "seed": seed, "model": json.dumps(model.spec()), "job": job_json,
             "versions": versions_json(),
             "optimizer_slots": json.dumps(list(state.optimizer_slots)), **(extra_attrs or {})}
    # Rank 0 makes the file durable in two steps, each in the background: an fdatasync as
    # soon as its rows are written, under the metadata HDF5 still has to write, then an
    # fsync after closing, under the read-back. The file is renamed only after both.
    syncs = []

    def written():
        if rank == 0:
            syncs.append(fsync.start(tmp, data_only=True))
        if on_written is not None:
            on_written()
    failed = _write_file(comm, tmp, tensors, attrs, written, slabs, state.params.size,
                         fail_write and rank == size - 1)

    def report_write():
        failure = failed
        if failure is None and rank == 0:
            try:
                seal.seal(tmp)
            except OSError as exc:
                failure = exc
        if failure is not None:
            raise CheckpointError(f"checkpoint at step {state.step} could not be written to "
                                  f"{tmp} ({describe_io_error(failure)}); earlier checkpoints "
                                  f"are untouched")
    try:
        _agree_or_remove(comm, report_write, tmp)
    except UserError:
        for wait in syncs:      # the fdatasync may still run; it holds a descriptor
            wait()
        raise
    if rank == 0:
        syncs.append(fsync.start(tmp))
    problems = verify(tmp, comm) if verify_after_write else []
    _publish_when_durable(comm, ckpt, final, keep_last, syncs, problems)
    return final


def _write_file(comm, tmp, tensors, attrs, written, slabs, slab_length, fail_write):
    """Create ``tmp`` and ``_write`` it; the exception a failed write raised, or None.
    ``fail_write``: fail as a full disk does, after writing (fault injection)."""
    failed = None
    try:
        fid = create_file(tmp, comm)
        try:
            failed = _write(fid, comm, tensors, attrs, written, slabs, slab_length)
        finally:
            fid.close()
        if fail_write:
            failed = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as exc:  # h5py's, too
        failed = failed or exc
    return failed


def _publish_when_durable(comm, ckpt, final, keep_last, syncs, problems):
    """Collective: once the fsyncs ``syncs`` ended well and the read-back found no
    ``problems``, rank 0 renames the file to ``final`` and points ``latest`` at it; else
    every rank raises the same ``CheckpointError`` and the temporary files are removed."""
    rank = 0 if comm is None else comm.Get_rank()
    directory, tmp = final.parent, final.with_name(final.name + ".tmp")
    step = int(NAME.match(final.name).group(1))
    doomed = []     # what to delete once published (rank 0)

    def flushed_and_verified():
        staging = None
        if rank == 0 and not problems:      # while the fsync may still run
            try:
                doomed.extend(ckpt.stage_index(step, keep_last))
            except OSError as exc:
                staging = exc
        failure = next((exc for exc in [wait() for wait in syncs] if exc is not None), None)
        if failure is not None:
            raise CheckpointError(f"checkpoint at step {step}: {describe_io_error(failure)}; "
                                  f"earlier checkpoints are untouched")
        if problems:
            raise CheckpointError(f"checkpoint {tmp} failed verification after writing: "
                                  f"{problems[0]}; earlier checkpoints are untouched")
        if staging is not None:
            raise _not_published(final, staging)
    _agree_or_remove(comm, flushed_and_verified, tmp, directory / ckpt.STAGED)

    def publish():
        if rank == 0:
            try:
                ckpt.publish(step, doomed)
            except OSError as exc:
                raise _not_published(final, exc) from None
    _agree(comm, publish)


def _not_published(final, exc):
    return CheckpointError(f"checkpoint {final} was written but not published "
                           f"({describe_io_error(exc)}); earlier checkpoints are untouched")


def _agree(comm, fn):
    """``agree`` over ``comm``; with no communicator, just ``fn()``."""
    return fn() if comm is None else agree(comm, fn)


def _agree_or_remove(comm, fn, *paths):
    """``_agree(comm, fn)``; when it fails on any rank, rank 0 removes the files ``paths``."""
    try:
        return _agree(comm, fn)
    except UserError:
        if comm is None or comm.Get_rank() == 0:
            for path in paths:
                path.unlink(missing_ok=True)
        raise


class AsyncSaver:
    """One checkpoint at a time written in the background from a copy of the state
    (``[checkpoint].async_write``), so training goes on while it is written.

    Rank 0's helper thread writes the whole file with serial HDF5 and no MPI call (the
    state is the same on every rank), then fsyncs, verifies and publishes it exactly as
    ``save``. A crash meanwhile leaves a ``.tmp`` file and the previous good checkpoint.
    ``wait`` (collective) ends the save in flight and agrees on its outcome; it is called
    before the next save and at the end of training, so a failure is raised there.
    """

    def __init__(self):
        self.step = None          # the step of the save in flight, on every rank
        self._thread = None
        self._failure = None

    def start(self, comm, run_dir, model, state, **save_args):
        """Hand a copy of ``state`` to the writer (rank 0); returns at once on every rank.
        ``save_args``: all of ``save``'s keyword arguments but ``on_written``."""
        self.step, self._run_dir, self._failure = state.step, run_dir, None
        if comm.Get_rank() != 0:
            return
        snapshot = Snapshot(state.params.copy(), state.optimizer_state.copy(), state.step,
                              state.epoch, state.step_in_epoch, state.optimizer_slots)
        world_size = comm.Get_size()    # asked here: the thread makes no MPI call

        def write():
            try:
                _save(None, run_dir, model, snapshot, on_written=None, world_size=world_size,
                      **save_args)
            except Exception as exc:    # noqa: BLE001 - handed to every rank by wait()
                self._failure = exc
        self._thread = threading.Thread(target=write, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def wait(self, comm):
        """Collective: the path of the save in flight once it is published (None if there
        was none); ``CheckpointError`` on every rank if it failed."""
        if self.step is None:
            return None
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        step, self.step = self.step, None

        def outcome():
            if isinstance(self._failure, UserError):
                raise self._failure
            if self._failure is not None:
                raise CheckpointError(f"background checkpoint at step {step} failed: "
                                      f"{describe_io_error(self._failure)}")
        _agree(comm, outcome)
        return checkpoint_dir(self._run_dir) / file_name(step)


def _write(fid, comm, tensors, attrs, on_written, slabs=(), slab_length=0):
    """Create every dataset (collective under mpio), write this rank's rows of each and its
    slab of each sharded dataset (then call ``on_written``), then store the root attributes
    ``attrs`` and every dataset's CRC32 as its ``crc32``.

    The CRC of what this rank writes is computed from memory (in a helper thread while the
    writes go on, when there is enough of it); the ranks' slab CRCs are then combined (one
    ``Allgather``). Returns the OSError/RuntimeError of a failed write (the file is still
    closed collectively), or None.
    """
    datasets = [new_dataset(fid, path, a.shape, a.dtype) for path, a in tensors]
    slab_datasets = [new_dataset(fid, path, (slab_length,), np.float32) for path, _ in slabs]
    if slabs:   # where this rank's shard starts in the flat datasets (before any write can fail)
        shard_sizes = np.empty(comm.Get_size(), np.int64)
        comm.Allgather(np.array([slabs[0][1].size], np.int64), shard_sizes)
        start = int(shard_sizes[:comm.Get_rank()].sum())
    rows = [rank_rows(array.shape[0], comm) for _, array in tensors]   # ((lo, hi), every rank's count)
    mine = sum(array[lo:hi].nbytes for (_, array), ((lo, hi), _) in zip(tensors, rows)) + \
        sum(slab.nbytes for _, slab in slabs)
    pipeline = CrcPipeline(len(datasets) + len(slab_datasets), mine)
    failed = None
    try:
        for i, (dset, (_, array), ((lo, hi), _)) in enumerate(zip(datasets, tensors, rows)):
            for a, b in chunks(hi - lo, array[:1].nbytes):
                part = array[lo + a:lo + b]
                write_rows(dset, lo + a, part, array.shape[0])
                pipeline.feed(i, part)
        for i, (dset, (_, slab)) in enumerate(zip(slab_datasets, slabs), start=len(datasets)):
            for a, b in chunks(slab.size, slab.itemsize):
                write_rows(dset, start + a, slab[a:b], slab_length)
                pipeline.feed(i, slab[a:b])
        if on_written is not None:
            on_written()
    except (OSError, RuntimeError) as exc:
        failed = exc
    for key, value in attrs.items():
        set_attr(fid, key, value)
    every = gather_crcs(comm, pipeline.results())
    listed = {}     # the manifest's datasets: path -> (shape, dtype, crc32)
    for i, (dset, (path, array), (_, counts)) in enumerate(zip(datasets, tensors, rows)):
        crc = combine(every[:, i], [n * array[:1].nbytes for n in counts])
        set_attr(dset, "crc32", crc)
        listed[path] = (array.shape, array.dtype, crc)
    for i, (dset, (path, _)) in enumerate(zip(slab_datasets, slabs), start=len(datasets)):
        crc = combine(every[:, i], shard_sizes * 4)
        set_attr(dset, "crc32", crc)
        listed[path] = ((slab_length,), np.float32, crc)
    for key, value in manifest.build(listed, {**attrs, "complete": 1}).items():
        set_attr(fid, key, value)
    set_attr(fid, "complete", 1)
    return failed
