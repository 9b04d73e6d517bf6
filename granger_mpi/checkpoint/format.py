"""The checkpoint file: its layout, ``verify`` and ``read`` (no MPI needed without a ``comm``).

Layout of ``RUN_DIR/ckpt/step_XXXXXXXX.h5`` (``h5ls -r`` and ``h5dump`` read it):

* ``/params/<name>`` and ``/optimizer/<slot>/<name>``: one dataset per named tensor, where
  the slots are the optimizer's state tensors (``velocity`` for SGD, ``m`` and ``v`` for
  Adam/AdamW); each carries a ``crc32`` attribute of its bytes. A run with a sharded
  optimizer (``[train].shard_optimizer``) writes each slot instead as one flat dataset
  ``/optimizer/<slot>`` (all parameters, in the flat buffer's order), every rank its slab;
  either layout resumes at any number of ranks, sharded or not (a sharded run reads and
  keeps only its new shard).
* root attributes: ``format``, ``format_version``, ``step`` (steps completed), ``epoch``, ``step_in_epoch``,
  ``world_size``, ``writers`` (the ranks that wrote the file: 1 or ``world_size``),
  ``seed``, ``model`` and ``job`` (JSON), ``versions`` (JSON), ``optimizer_slots`` (JSON
  list), the manifest (``storage.manifest``: every dataset's shape, dtype and CRC32 and
  every attribute's value, itself checksummed), ``complete`` (written last). The
  optimizer's step count is ``step``.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from mpi4py import MPI

from granger_mpi.data import partition
from granger_mpi.errors import UserError, WriteError
from granger_mpi.model.modelfile import CHECKPOINT_FORMAT
from granger_mpi.model.modelfile import FORMAT as MODEL_FORMAT
from granger_mpi.storage import manifest, seal
from granger_mpi.storage.checksums import CrcPipeline, chunks, combine, crc32
from granger_mpi.storage.h5files import (datasets, int_attr, json_attr, open_file, open_for_reading, read_rows,
                                         stored_layout)

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


def tensors(model, state):
    """``(dataset path, array)`` of everything saved, in a fixed order."""
    out = []
    groups = [("params", state.params)]
    if state.optimizer_shard is None:   # sharded state is written as slabs (_slabs)
        groups += [(f"optimizer/{slot}", state.slot(i)) for i, slot in enumerate(state.optimizer_slots)]
    for group, flat in groups:
        for name, view in model.layout.views(flat).items():
            out.append((f"{group}/{name}", view))
    return out


def rank_rows(length, comm):
    """This rank's ``(lo, hi)`` of ``length`` rows, and every rank's row count (``comm``
    None: one process, without MPI)."""
    rank, size = (0, 1) if comm is None else (comm.Get_rank(), comm.Get_size())
    bounds = [partition.rank_bounds(length, size, r) for r in range(size)]
    return bounds[rank], [hi - lo for lo, hi in bounds]


def gather_crcs(comm, crcs):
    """Every rank's slab CRCs, a row per rank."""
    mine = np.array(crcs, np.int64)
    if comm is None:
        return mine[None, :]
    every = np.empty((comm.Get_size(), mine.size), np.int64)
    comm.Allgather(mine, every)
    return every


def _dataset_crcs(fid, comm):
    """``(path, shape, dtype, stored crc32 or None, this rank's slab CRC, every rank's slab
    bytes)`` of every dataset in the file, each rank reading its rows (in chunks, the CRC
    overlapping the next read)."""
    found = [(name, did, stored_layout(did)) for name, did in datasets(fid)]
    sizes = [(dims[0], file_type.get_size() * math.prod(dims[1:]))    # (rows, bytes a row)
             for _, _, (dims, file_type) in found]
    share = 1 if comm is None else comm.Get_size()
    pipeline = CrcPipeline(len(found), sum(rows * row_bytes for rows, row_bytes in sizes) // share)
    scratch = np.empty(0, np.uint8)
    layout = []
    for i, ((name, did, stored_as), (rows, row_bytes)) in enumerate(zip(found, sizes)):
        (lo, hi), counts = rank_rows(rows, comm)
        for a, b in chunks(hi - lo, row_bytes):
            # the helper thread may still hold a chunk it was fed
            if not pipeline.inline or scratch.size < (b - a) * row_bytes:
                scratch = np.empty((b - a) * row_bytes, np.uint8)
            pipeline.feed(i, read_rows(did, lo + a, lo + b, scratch, stored_as))
        layout.append((name, did.shape, stored_as[1].dtype, int_attr(did, "crc32"),
                       [n * row_bytes for n in counts]))
    return [(*entry[:4], crc, entry[4]) for entry, crc in zip(layout, pipeline.results())]


def verify(path, comm=None):
    """Problems found in a checkpoint or model file (empty when it is good); needs no MPI.

    Checked first, without HDF5, the seal (``storage.seal``; one process only: a collective
    verify is the read-back of a file just written); then the format and its version, ``complete``, the step of a checkpoint's name, and
    the manifest (``storage.manifest``): every root attribute's value, and every dataset's
    name, shape, dtype and CRC32 of its bytes (and its own ``crc32`` attribute).

    With a ``comm`` (collective), each rank reads and checksums its share of every
    dataset's rows and all get the same answer: a rank that cannot open or read the file
    says so (one ``Allreduce``) before the others would wait for it in the ``Allgather``.
    """
    fid, listed, found, problems = None, None, [], []
    if comm is None and (broken := seal.problem(path)):     # before HDF5 reads it (seal)
        return [broken]
    try:
        fid = open_file(path, "checkpoint")
        attrs = dict(h5py.File(fid).attrs)
        fmt = attrs.get("format")
        if fmt not in (FORMAT, MODEL_FORMAT):
            problems = [f"{path}: not a granger-mpi checkpoint or model file"]
        elif fmt == FORMAT and attrs.get("complete") != 1:
            problems = [f"{path}: incomplete (the save did not finish)"]
        elif problem := manifest.version_problem(attrs, path, "checkpoint" if fmt == FORMAT else "model file"):
            problems = [problem]
        elif (named := NAME.match(Path(path).name)) and attrs.get("step") != int(named.group(1)):
            problems = [f"{path}: holds step {attrs.get('step')}, not the step of its name"]
        else:
            listed, problems = manifest.read(attrs, path)
            if listed is not None:
                found = _dataset_crcs(fid, comm)
    except UserError as exc:
        listed, problems = None, [str(exc)]
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:   # h5py's, on damage
        listed, problems = None, [f"{path}: unreadable ({exc})"]
    try:
        if _failed_anywhere(comm, listed is None):
            return problems or [f"{path}: unreadable on another rank"]
        every = gather_crcs(comm, [crc for *_, crc, _ in found])
    finally:
        if fid is not None:
            fid.close()
    computed = {name: (shape, dtype, combine(every[:, i], nbytes), stored)
                for i, (name, shape, dtype, stored, _, nbytes) in enumerate(found)}
    return problems + manifest.dataset_problems(listed, computed, path)


def kind(path) -> str | None:
    """The ``format`` attribute of a file (``FORMAT`` for a checkpoint)."""
    with open_for_reading(path, "checkpoint") as f:
        value = f.attrs.get("format")
    return value if isinstance(value, str) else None


def _failed_anywhere(comm, failed):
    """Whether ``failed`` is true on any rank of ``comm`` (None: this process)."""
    if comm is None:
        return failed
    flag = np.array([failed], np.int32)
    comm.Allreduce(MPI.IN_PLACE, flag, op=MPI.MAX)
    return bool(flag[0])


READ_CHUNK_ELEMENTS = 1 << 22   # 16 MiB of float32: the most a shard read holds extra


def _read_part(f, path, listed, group, model, out, lo, hi):
    """Fill ``out`` with elements ``lo:hi`` of the flat tensor stored at ``/group``.

    ``/group`` is one flat dataset (sharded layout) or a group of named tensors. Every
    dataset's CRC32 is checked on all its bytes as read, against the manifest's datasets
    ``listed``; beyond ``out`` at most one tensor
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
        if checksum != listed.get(group, {}).get("crc32"):
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
        if crc32(data) != listed.get(f"{group}/{tensor.name}", {}).get("crc32"):
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
    try:
        return _read(path, model, optimizer_slots, optimizer_shard)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:    # h5py's, on damage
        raise CheckpointError(f"checkpoint {path} is damaged: unreadable ({exc})") from None


def _read(path, model, optimizer_slots, optimizer_shard):
    with open_for_reading(path, "checkpoint") as f:
        attrs = dict(f.attrs)
        if attrs.get("format") != FORMAT or attrs.get("complete") != 1:
            raise CheckpointError(f"checkpoint {path} is damaged: not a complete granger-mpi checkpoint")
        if problem := manifest.version_problem(attrs, path, "checkpoint"):
            raise UserError(problem)
        listed, problems = manifest.read(attrs, path)
        if problems:
            raise CheckpointError(f"checkpoint {path} is damaged: {problems[0].removeprefix(f'{path}: ')}")
        listed = listed["datasets"]
        saved = json_attr(f, "model", path)
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
        _read_part(f, path, listed, "params", model, params, 0, n)
        optimizer_state = np.empty(len(optimizer_slots) * (hi - lo), np.float32)
        for i, slot in enumerate(optimizer_slots):
            _read_part(f, path, listed, f"optimizer/{slot}", model,
                       optimizer_state[i * (hi - lo):(i + 1) * (hi - lo)], lo, hi)
    state = Snapshot(params, optimizer_state, int(attrs["step"]), int(attrs["epoch"]),
                       int(attrs["step_in_epoch"]), tuple(optimizer_slots), optimizer_shard)
    return state, attrs
