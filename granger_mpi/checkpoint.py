"""Checkpoints: one parallel-HDF5 file per save, atomic and self-verifying.

Layout of ``RUN_DIR/ckpt/step_XXXXXXXX.h5`` (``h5ls -r`` and ``h5dump`` read it):

* ``/params/<name>`` and ``/optimizer/<slot>/<name>``: one dataset per named tensor, where
  the slots are the optimizer's state tensors (``velocity`` for SGD, ``m`` and ``v`` for
  Adam/AdamW); each carries a ``crc32`` attribute of its bytes. A run with a sharded
  optimizer (``[train].shard_optimizer``) writes each slot instead as one flat dataset
  ``/optimizer/<slot>`` (all parameters, in the flat buffer's order), every rank its slab;
  either layout resumes at any number of ranks, sharded or not (a sharded run reads and
  keeps only its new shard).
* root attributes: ``format``, ``step`` (steps completed), ``epoch``, ``step_in_epoch``,
  ``world_size``, ``writers`` (the ranks that wrote the file: 1 or ``world_size``),
  ``seed``, ``model`` and ``job`` (JSON), ``versions`` (JSON), ``optimizer_slots`` (JSON
  list), ``complete`` (written last). The optimizer's step count is ``step``.

How a save stays atomic (SCR, PyTorch DCP): the state goes into ``step_XXXXXXXX.h5.tmp``,
each tensor checksummed from memory as it is written (``checksums``); the file is fsynced
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
import math
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from mpi4py import MPI

from granger_mpi.data import partition
from granger_mpi.storage import fsync
from granger_mpi.storage.checksums import chunks, combine, crc32, CrcPipeline
from granger_mpi.errors import UserError, WriteError, describe_io_error
from granger_mpi.storage.h5files import (create_file, datasets, int_attr, new_dataset, open_file,
                                         open_for_reading, read_rows, set_attr, stored_layout,
                                         str_attr, write_rows)
from granger_mpi.model.modelfile import CHECKPOINT_FORMAT
from granger_mpi.mpi.runtime import agree, raise_from_root
from granger_mpi.storage.versions import versions_json

FORMAT = CHECKPOINT_FORMAT
NAME = re.compile(r"^step_(\d{8})\.h5$")


class CheckpointError(WriteError):
    """A checkpoint could not be written or read; earlier checkpoints are untouched."""


@dataclass
class Snapshot:
    """What a run needs to continue exactly where it stopped."""

    params: np.ndarray
    optimizer_state: np.ndarray   # len(optimizer_slots) flat tensors the size of params, end to end
    step: int            # steps completed since the start of the run
    epoch: int           # epoch of the next step
    step_in_epoch: int   # index of the next step inside its epoch
    optimizer_slots: tuple = ("velocity",)
    optimizer_shard: tuple | None = None   # (lo, hi): optimizer_state covers params[lo:hi] only

    def slot(self, index):
        """The ``index``-th optimizer state tensor (flat; this rank's shard if sharded)."""
        lo, hi = self.optimizer_shard or (0, self.params.size)
        n = hi - lo
        return self.optimizer_state[index * n:(index + 1) * n]


def checkpoint_dir(run_dir):
    """Where a run's checkpoints live."""
    return Path(run_dir) / "ckpt"


def file_name(step):
    """``step_00000042.h5``."""
    return f"step_{step:08d}.h5"


def _tensors(model, state):
    """``(dataset path, array)`` of everything saved, in a fixed order."""
    out = []
    groups = [("params", state.params)]
    if state.optimizer_shard is None:   # sharded state is written as slabs (_slabs)
        groups += [(f"optimizer/{slot}", state.slot(i)) for i, slot in enumerate(state.optimizer_slots)]
    for group, flat in groups:
        for name, view in model.layout.views(flat).items():
            out.append((f"{group}/{name}", view))
    return out


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
    raise_from_root(comm, failure)    # the others wait for rank 0's outcome, sleeping
    return checkpoint_dir(run_dir) / file_name(state.step)


def _save(comm, run_dir, model, state, *, job_json, seed, keep_last, extra_attrs,
          verify_after_write, on_written, world_size, fail_write=False):
    """``save`` by every rank of ``comm`` through the mpio driver, or (``comm`` None) by
    this process alone with serial HDF5 and no MPI call (rank 0 for all, and
    ``AsyncSaver``'s thread); ``world_size`` is the number of ranks the state is from."""
    directory = checkpoint_dir(run_dir)
    final = directory / file_name(state.step)
    tmp = final.with_name(final.name + ".tmp")
    rank, size = (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())
    tensors = _tensors(model, state)
    slabs = []   # (dataset path, this rank's slab); sharded optimizer state only
    if state.optimizer_shard is not None:
        slabs = [(f"optimizer/{slot}", state.slot(i)) for i, slot in enumerate(state.optimizer_slots)]

    def prepare():
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            wait_for_pruning()
    _agree(comm, prepare)
    attrs = {"format": FORMAT, "step": state.step, "epoch": state.epoch,
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
        if failed is not None:
            raise CheckpointError(f"checkpoint at step {state.step} could not be written to "
                                  f"{tmp} ({describe_io_error(failed)}); earlier checkpoints "
                                  f"are untouched")
    try:
        _agree_or_remove(comm, report_write, tmp)
    except UserError:
        for wait in syncs:      # the fdatasync may still run; it holds a descriptor
            wait()
        raise
    if rank == 0:
        syncs.append(fsync.start(tmp))
    problems = verify(tmp, comm, expected=[path for path, _ in tensors + slabs]) if verify_after_write else []
    _publish_when_durable(comm, final, keep_last, syncs, problems)
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


def _publish_when_durable(comm, final, keep_last, syncs, problems):
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
                doomed.extend(_stage_index(directory, step, keep_last))
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
    _agree_or_remove(comm, flushed_and_verified, tmp, *(directory / name for name in _STAGED))

    def publish():
        if rank == 0:
            try:
                _publish(directory, step, doomed)
            except OSError as exc:
                raise _not_published(final, exc) from None
    _agree(comm, publish)


def _not_published(final, exc):
    return CheckpointError(f"checkpoint {final} was written but not published "
                           f"({describe_io_error(exc)}); earlier checkpoints are untouched")


# A helper thread for deleting old checkpoints, which a save need not wait for.
_io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-io")


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


def _rows(length, comm):
    """This rank's ``(lo, hi)`` of ``length`` rows, and every rank's row count (``comm``
    None: one process, without MPI)."""
    rank, size = (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())
    bounds = [partition.rank_bounds(length, size, r) for r in range(size)]
    return bounds[rank], [hi - lo for lo, hi in bounds]


def _gather_crcs(comm, crcs):
    """Every rank's slab CRCs, a row per rank."""
    mine = np.array(crcs, np.int64)
    if comm is None:
        return mine[None, :]
    every = np.empty((comm.Get_size(), mine.size), np.int64)
    comm.Allgather(mine, every)
    return every


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
    rows = [_rows(array.shape[0], comm) for _, array in tensors]   # ((lo, hi), every rank's count)
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
    every = _gather_crcs(comm, pipeline.results())
    for i, (dset, (_, array), (_, counts)) in enumerate(zip(datasets, tensors, rows)):
        set_attr(dset, "crc32", combine(every[:, i], [n * array[:1].nbytes for n in counts]))
    for i, dset in enumerate(slab_datasets, start=len(datasets)):
        set_attr(dset, "crc32", combine(every[:, i], shard_sizes * 4))
    set_attr(fid, "complete", 1)
    return failed


_pruning = None   # the deletion of checkpoints beyond keep_last in flight (rank 0)

# The index that will point at the new checkpoint, written while the new file is fsynced.
_STAGED = ("latest.tmp",)


def _stage_index(directory, step, keep_last):
    """Write the index that will point at ``step`` as ``latest.tmp``. Returns the checkpoints
    to delete once ``latest`` points at ``step``: those beyond the newest ``keep_last``."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        steps = sorted({step} | {int(m.group(1)) for entry in os.listdir(dir_fd)
                                 if (m := NAME.match(entry))})
        keep = [s for s in steps if s <= step][-keep_last:]
        index = {"latest": file_name(step), "step": step, "kept": [file_name(s) for s in keep]}
        _write_new(_STAGED[0], (json.dumps(index, indent=1) + "\n").encode(), dir_fd)
    finally:
        os.close(dir_fd)
    return [directory / file_name(s) for s in steps if s not in keep and s < step]


def _publish(directory, step, doomed):
    """Rename the verified ``step_XXXXXXXX.h5.tmp`` to its final name and ``latest.tmp`` over
    ``latest``, make both renames durable with one fsync of the directory, then start
    deleting ``doomed`` in the helper thread (unlinking a GiB file takes
    a good part of a second, which training need not wait for; the next save, and
    ``wait_for_pruning``, wait for it). Names are resolved through one descriptor of the
    directory, the one fsynced."""
    global _pruning
    name = file_name(step)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.replace(name + ".tmp", name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.replace(_STAGED[0], "latest", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    if doomed:
        _pruning = _io.submit(_prune, doomed)


def _prune(doomed):
    for path in doomed:
        path.unlink(missing_ok=True)


def _write_new(name, data, dir_fd):
    """Write ``data`` to the file ``name`` in the directory open as ``dir_fd`` (truncated)."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
    try:
        if os.write(fd, data) != len(data):     # a regular file: short only when full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    finally:
        os.close(fd)


def wait_for_pruning():
    """Wait until old checkpoints are deleted."""
    if _pruning is not None:
        _pruning.result()


def finish_run():
    """Before a process that saved ends: wait until old checkpoints are deleted."""
    wait_for_pruning()


def _dataset_crcs(fid, comm, expected=None):
    """``(path, stored crc32 or None, this rank's slab CRC, every rank's slab bytes)`` of each
    dataset (of the paths ``expected``, or all), each rank reading its rows (in chunks, the
    CRC overlapping the next read)."""
    found = [(name, did, stored_layout(did)) for name, did in datasets(fid, expected)]
    sizes = [(dims[0], file_type.get_size() * math.prod(dims[1:]))    # (rows, bytes a row)
             for _, _, (dims, file_type) in found]
    share = 1 if comm is None else comm.Get_size()
    pipeline = CrcPipeline(len(found), sum(rows * row_bytes for rows, row_bytes in sizes) // share)
    scratch = np.empty(0, np.uint8)
    layout = []
    for i, ((name, did, stored_as), (rows, row_bytes)) in enumerate(zip(found, sizes)):
        (lo, hi), counts = _rows(rows, comm)
        for a, b in chunks(hi - lo, row_bytes):
            # the helper thread may still hold a chunk it was fed
            if not pipeline.inline or scratch.size < (b - a) * row_bytes:
                scratch = np.empty((b - a) * row_bytes, np.uint8)
            pipeline.feed(i, read_rows(did, lo + a, lo + b, scratch, stored_as))
        layout.append((name, int_attr(did, "crc32"), [n * row_bytes for n in counts]))
    return [(name, stored, crc, nbytes) for (name, stored, nbytes), crc in zip(layout, pipeline.results())]


def verify(path, comm=None, expected=None):
    """Problems found in a checkpoint file (empty when it is good); needs no MPI.

    ``expected``: the paths of the datasets it must hold, when known (a file just written):
    those are checked, opened by name, where otherwise the datasets are found by visiting
    the file (0.3 ms of a 1 MiB save); one missing makes the file unreadable. A file named
    as a checkpoint (``step_XXXXXXXX.h5``) must hold that step.

    With a ``comm`` (collective), each rank reads and checksums its share of every
    dataset's rows and all get the same answer: a rank that cannot open or read the file
    says so (one ``Allreduce``) before the others would wait for it in the ``Allgather``.
    """
    fid, found, problem = None, [], None
    try:
        fid = open_file(path, "checkpoint")
        if str_attr(fid, "format") != FORMAT:
            problem = f"{path}: not a granger-mpi checkpoint"
        elif int_attr(fid, "complete") != 1:
            problem = f"{path}: incomplete (the save did not finish)"
        elif (named := NAME.match(Path(path).name)) and int_attr(fid, "step") != int(named.group(1)):
            problem = f"{path}: holds step {int_attr(fid, 'step')}, not the step of its name"
        else:
            found = _dataset_crcs(fid, comm, expected)
    except UserError as exc:
        problem = str(exc)
    except (OSError, KeyError, ValueError, TypeError) as exc:
        problem = f"{path}: unreadable ({exc})"
    try:
        if _failed_anywhere(comm, problem is not None):
            return [problem or f"{path}: unreadable on another rank"]
        every = _gather_crcs(comm, [crc for _, _, crc, _ in found])
    finally:
        if fid is not None:
            fid.close()
    problems = []
    for i, (name, stored, _, nbytes) in enumerate(found):
        computed = combine(every[:, i], nbytes)
        if stored is None:
            problems.append(f"/{name}: no crc32 attribute")
        elif computed != stored:
            problems.append(f"/{name}: checksum mismatch (stored {stored}, computed {computed})")
    return problems


def _failed_anywhere(comm, failed):
    """Whether ``failed`` is true on any rank of ``comm`` (None: this process)."""
    if comm is None:
        return failed
    flag = np.array([failed], np.int32)
    comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.MAX)
    return bool(flag[0])


def candidates(run_dir):
    """Checkpoint files of a run, newest first."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def newest_good(run_dir, report=print):
    """The newest checkpoint that verifies; each bad one is reported and skipped.

    None only when the run has no checkpoint at all (no file, nothing in ``ckpt/latest``):
    a run that ended before its first save starts again from step 0. When it has
    checkpoints and none verifies (torn, bit-rotted, purged from scratch), ``UserError``
    names each and why: starting over would overwrite the run's metrics and model.
    """
    failed = []
    for path in candidates(run_dir):
        problems = verify(path)
        if not problems:
            return path
        report(f"skipping checkpoint {path}: {problems[0]}")
        reason = problems[0].removeprefix(f"{path}: ").replace(f"checkpoint {path} is ", "")
        failed.append(f"{path.name}: {reason}")
    failed += _indexed_but_missing(checkpoint_dir(run_dir))
    if not failed:
        return None
    raise UserError(f"--resume auto: {checkpoint_dir(run_dir)} holds checkpoints but none verifies "
                    f"({'; '.join(failed)}); not starting again from step 0 over this run: "
                    f"resume with --resume PATH, or start anew with --overwrite")


def _indexed_but_missing(directory):
    """What ``latest`` names that is not there, each as a reason (an unreadable index is one)."""
    try:
        index = json.loads((directory / "latest").read_text())
        named = {index["latest"], *index.get("kept", ())}
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"latest: unreadable index ({exc})"]
    return [f"{name}: named in latest but missing" for name in sorted(named, reverse=True)
            if not (directory / name).exists()]


READ_CHUNK_ELEMENTS = 1 << 22   # 16 MiB of float32: the most a shard read holds extra


def _read_part(f, path, group, model, out, lo, hi):
    """Fill ``out`` with elements ``lo:hi`` of the flat tensor stored at ``/group``.

    ``/group`` is one flat dataset (sharded layout) or a group of named tensors. Every
    dataset's CRC32 is checked on all its bytes as read; beyond ``out`` at most one tensor
    or one chunk of ``READ_CHUNK_ELEMENTS`` is held, so a shard costs 1/P of the memory.
    """
    n = model.layout.size
    whole = (lo, hi) == (0, n)
    node = f.get(group)
    if node is None:
        raise CheckpointError(f"checkpoint {path} is damaged: /{group} is missing")
    if isinstance(node, h5py.Dataset):
        if node.shape != (n,):
            raise CheckpointError(f"checkpoint {path} is damaged: /{group} has shape "
                                  f"{node.shape}, expected ({n},)")
        if whole:
            node.read_direct(out)
            checksum = crc32(out)
        else:
            checksum = 0
            for start in range(0, n, READ_CHUNK_ELEMENTS):
                stop = min(n, start + READ_CHUNK_ELEMENTS)
                chunk = np.ascontiguousarray(node[start:stop], np.float32)
                checksum = crc32(chunk, checksum)
                a, b = max(start, lo), min(stop, hi)
                if a < b:
                    out[a - lo:b - lo] = chunk[a - start:b - start]
        if checksum != int(node.attrs.get("crc32", -1)):
            raise CheckpointError(f"checkpoint {path} is damaged: /{group}: checksum mismatch")
        return
    for tensor in model.layout.tensors:
        if tensor.name not in node:
            raise CheckpointError(f"checkpoint {path} is damaged: /{group}/{tensor.name} is missing")
        dset = node[tensor.name]
        if whole:
            data = out[tensor.offset:tensor.offset + tensor.size].reshape(tensor.shape)
            dset.read_direct(data)
        else:
            data = np.ascontiguousarray(dset[...], np.float32)
        if crc32(data) != int(dset.attrs.get("crc32", -1)):
            raise CheckpointError(f"checkpoint {path} is damaged: /{group}/{tensor.name}: "
                                  f"checksum mismatch")
        a, b = max(tensor.offset, lo), min(tensor.offset + tensor.size, hi)
        if not whole and a < b:
            out[a - lo:b - lo] = data.ravel()[a - tensor.offset:b - tensor.offset]


def read(path, model, optimizer_slots=("velocity",), optimizer_shard=None):
    """The ``Snapshot`` saved in ``path`` and its root attributes.

    ``optimizer_slots`` are the state tensors the run's optimizer needs; a checkpoint of
    another optimizer is refused, naming both. With ``optimizer_shard=(lo, hi)`` only
    that slice of each slot is kept (a sharded optimizer; either layout can be read).
    Every tensor's checksum is checked on the bytes as read, so the file is read once.
    """
    with open_for_reading(path, "checkpoint") as f:
        if f.attrs.get("format") != FORMAT or f.attrs.get("complete") != 1:
            raise CheckpointError(f"checkpoint {path} is damaged: not a complete granger-mpi checkpoint")
        saved = json.loads(f.attrs["model"])
        if saved != model.spec():
            differing = [k for k in model.spec() if saved.get(k) != model.spec()[k]]
            raise UserError(f"checkpoint {path} holds a different model ({differing[0]}: "
                            f"{saved.get(differing[0])} in the checkpoint, "
                            f"{model.spec()[differing[0]]} in the job)")
        saved_slots = tuple(json.loads(f.attrs.get("optimizer_slots", '["velocity"]')))
        if saved_slots != tuple(optimizer_slots):
            raise UserError(f"checkpoint {path} holds optimizer state {', '.join(saved_slots)}; "
                            f"this job's optimizer needs {', '.join(optimizer_slots)}")
        n = model.layout.size
        lo, hi = optimizer_shard or (0, n)
        params = np.empty(n, np.float32)
        _read_part(f, path, "params", model, params, 0, n)
        optimizer_state = np.empty(len(optimizer_slots) * (hi - lo), np.float32)
        for i, slot in enumerate(optimizer_slots):
            _read_part(f, path, f"optimizer/{slot}", model,
                       optimizer_state[i * (hi - lo):(i + 1) * (hi - lo)], lo, hi)
        attrs = dict(f.attrs)
    state = Snapshot(params, optimizer_state, int(attrs["step"]), int(attrs["epoch"]),
                       int(attrs["step_in_epoch"]), tuple(optimizer_slots), optimizer_shard)
    return state, attrs
