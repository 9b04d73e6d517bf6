"""Datasets: one HDF5 file with float32 features ``/X`` (rows x features) and targets ``/y``.

``/y`` holds int32 class labels (classification) or float32 values, one column per target
(regression). Root attributes describe the problem (``task``, ``n_classes``,
``n_features``, ``n_targets``, ``n_rows``, how it was made). ``/X`` is chunked by rows.
``/integrity`` holds checksums of blocks of rows (``integrity``), checked on every read.

Readers never load a whole file: each rank reads only its region of the file (the lanes
the partition gives it), a few steps ahead in a background thread, within a memory budget.
"""

import functools
import json
import math
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from granger_mpi.data import integrity, partition
from granger_mpi.errors import UserError
from granger_mpi.storage.h5files import open_for_reading

FORMAT = "granger-mpi dataset"
FORMAT_VERSION = 1
CHUNK_BYTES = 1 << 20   # target size of one /X chunk
MAX_CLASSES = 1 << 20   # an output layer wider than this is a wrong label column, not a model
BLOCK_CHUNKS = 16       # synthetic rows are drawn in blocks of this many chunks


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset file holds, checked on open."""

    path: Path
    n_rows: int
    n_features: int
    task: str          # "classification" or "regression"
    n_classes: int     # 0 for regression
    n_targets: int     # 1 for classification
    x_itemsize: int = 4   # bytes of one stored value of /X and of /y
    y_itemsize: int = 4
    checksummed: bool = False   # has /integrity (checked on every read)

    @property
    def n_outputs(self):
        """Width of a model's output layer for this dataset."""
        return self.n_classes if self.task == "classification" else self.n_targets

    @property
    def row_bytes(self):
        """Bytes of one row as stored (and held by a rank, which keeps the stored dtypes)."""
        return self.x_itemsize * self.n_features + self.y_itemsize * self.n_targets

    @functools.cached_property
    def fingerprint(self):
        """``integrity.fingerprint`` of the file, read once per ``DatasetInfo`` (a resume
        compares it with the checkpoint's, and every save records it)."""
        return integrity.fingerprint(self.path)

    @property
    def window(self):
        """Rows per window of the partition rule (and per checksum block) for this file."""
        return partition.window_rows(self.row_bytes)


def chunk_rows(n_features, n_rows):
    """Rows per ``/X`` chunk: about ``CHUNK_BYTES``, at least 1, at most ``n_rows``."""
    return int(max(1, min(n_rows, CHUNK_BYTES // (4 * n_features))))


def open_info(path, allow_external=False):
    """Check a dataset file and describe it; ``UserError`` names the file and the problem.
    ``allow_external``: accept ``/X`` or ``/y`` whose values live in other files (HDF5
    external storage, virtual datasets), which training would read whatever they are."""
    path = Path(path)
    with open_for_reading(path, "dataset file") as f:
        for name in ("X", "y"):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise UserError(f"dataset file {path} has no /{name} dataset "
                                f"(granger-mpi needs /X rows x features and /y targets)")
            _check_storage(path, name, f[name], allow_external)
        X, y = f["X"], f["y"]
        if X.ndim != 2 or X.dtype.kind != "f":
            raise UserError(f"{path}: /X must be a 2-D float array (rows x features), "
                            f"got {X.ndim}-D {X.dtype}")
        if X.shape[0] < 1 or X.shape[1] < 1:
            raise UserError(f"{path}: /X is empty (shape {X.shape})")
        if y.shape[:1] != X.shape[:1]:
            raise UserError(f"{path}: /X has {X.shape[0]} rows but /y has "
                            f"{y.shape[0] if y.ndim else 0}; they must match")
        task = f.attrs.get("task")
        task = task.decode() if isinstance(task, bytes) else task
        if task is None:
            task = "classification" if y.dtype.kind in "iu" else "regression"
        if task == "classification":
            if y.ndim != 1 or y.dtype.kind not in "iu":
                raise UserError(f"{path}: /y of a classification dataset must be 1-D integer "
                                f"labels, got {y.ndim}-D {y.dtype}")
            if "n_classes" in f.attrs:
                n_classes = f.attrs["n_classes"]
                if not isinstance(n_classes, (int, np.integer)) or isinstance(n_classes, bool):
                    raise UserError(f"{path}: attribute n_classes must be an integer, got "
                                    f"{n_classes!r}")
                n_classes = int(n_classes)
            else:
                _check_labels_below(path, y, MAX_CLASSES)
                n_classes = _max_label(y) + 1
            if n_classes < 2:
                raise UserError(f"{path}: a classification dataset needs at least 2 classes, "
                                f"found {n_classes}")
            if n_classes > MAX_CLASSES:
                raise UserError(f"{path}: its n_classes is {n_classes}, more than the "
                                f"{MAX_CLASSES:,} classes granger-mpi supports")
            n_targets = 1
        elif task == "regression":
            if y.ndim not in (1, 2) or y.dtype.kind != "f":
                raise UserError(f"{path}: /y of a regression dataset must be a 1-D or 2-D float "
                                f"array, got {y.ndim}-D {y.dtype}")
            n_classes, n_targets = 0, (1 if y.ndim == 1 else y.shape[1])
        else:
            raise UserError(f"{path}: attribute task={task!r} must be 'classification' or 'regression'")
        return DatasetInfo(path, int(X.shape[0]), int(X.shape[1]), task, n_classes, n_targets,
                           X.dtype.itemsize, y.dtype.itemsize, integrity.GROUP in f)


def _check_storage(path, name, ds, allow_external):
    """Refuse values stored outside the file (unless allowed) or never stored: a small file
    claiming 2**40 rows would otherwise be believed, and allocated for."""
    where = ("a virtual dataset (its values come from other files)" if ds.is_virtual else
             f"HDF5 external storage (file {ds.external[0][0]})" if ds.external else None)
    if where is not None:
        if not allow_external:
            verb = "is" if ds.is_virtual else "uses"
            raise UserError(f"{path}: /{name} {verb} {where}; set [data].allow_external_storage "
                            f"= true to train on it")
        return
    expected = ds.size * ds.dtype.itemsize
    if ds.chunks is None:
        complete = ds.id.get_storage_size() >= expected
    else:
        chunks = math.prod(-(-n // c) for n, c in zip(ds.shape, ds.chunks))
        complete = ds.id.get_num_chunks() >= chunks
    if not complete:
        raise UserError(f"{path}: /{name} claims {ds.shape[0]:,} rows but stores "
                        f"{ds.id.get_storage_size():,} of their {expected:,} bytes: its values "
                        f"were never written")


_LABEL_CHUNK = 1 << 20


def _max_label(y):
    """Largest label, read in chunks (only /y, which is small)."""
    return int(max(y[i:i + _LABEL_CHUNK].max() for i in range(0, y.shape[0], _LABEL_CHUNK)))


def _check_labels_below(path, y, limit):
    """``UserError`` naming the first row of ``/y`` whose label is outside [0, limit),
    compared in the stored dtype (a cast to int32 first would wrap 2**32 + 1 to 1)."""
    for start in range(0, y.shape[0], _LABEL_CHUNK):
        block = y[start:start + _LABEL_CHUNK]
        bad = np.flatnonzero((block < 0) | (block >= limit))
        if bad.size:
            row = start + int(bad[0])
            raise UserError(f"{path}: row {row} of /y has label {block[bad[0]]}, outside "
                            f"[0, {limit:,}) (granger-mpi supports up to {MAX_CLASSES:,} classes)")


def labels_as_int32(values, n_classes):
    """Class labels as the kernels take them (int32), any out-of-range label as -1.

    The range is checked in the stored dtype before the cast, so that a label of 2**32 + 1
    cannot wrap to a valid class; -1 then fails the kernels' per-batch check, which names
    the row.
    """
    values = np.asarray(values)
    if values.dtype == np.int32:
        return np.ascontiguousarray(values)
    return np.where((values < 0) | (values >= n_classes), -1, values).astype(np.int32)


def _create(f, n_rows, n_features, task, n_classes, n_targets, attrs, resizable=False):
    """Create ``/X`` and ``/y`` and the root attributes; collective under the mpio driver."""
    rows = chunk_rows(n_features, max(n_rows, 1))
    maxrows = None if resizable else n_rows
    X = f.create_dataset("X", (n_rows, n_features), np.float32, chunks=(rows, n_features),
                         maxshape=(maxrows, n_features), fill_time="never")
    if task == "classification":
        y = f.create_dataset("y", (n_rows,), np.int32, chunks=(rows,), maxshape=(maxrows,),
                             fill_time="never")
    else:
        shape = (n_rows,) if n_targets == 1 else (n_rows, n_targets)
        y = f.create_dataset("y", shape, np.float32, chunks=(rows,) + shape[1:],
                             maxshape=(maxrows,) + shape[1:], fill_time="never")
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "task": task,
            "n_classes": n_classes, "n_features": n_features, "n_targets": n_targets,
            "n_rows": n_rows, **attrs}
    for key, value in meta.items():
        f.attrs[key] = value
    return X, y


@dataclass(frozen=True)
class SyntheticProblem:
    """A seeded synthetic problem; row ``i`` depends on (seed, stream, i) only, never on P.

    Classification: each class is a mixture of ``clusters`` Gaussian blobs (unit noise)
    whose centres are drawn with spread ``separation``: not linearly separable, so an MLP
    beats softmax regression. Regression: a random linear teacher plus 0.1 noise.
    """

    task: str
    n_features: int
    n_classes: int = 10
    n_targets: int = 1
    clusters: int = 2
    separation: float = 1.0
    seed: int = 0

    def block(self, stream, index, start, stop):
        """Rows ``[start, stop)`` of block ``index`` of ``stream`` (0 train, 1 test)."""
        problem = np.random.Generator(np.random.PCG64([self.seed, 0]))
        rng = np.random.Generator(np.random.PCG64([self.seed, 1 + stream, index]))
        n = stop - start
        if self.task == "classification":
            centres = problem.normal(0.0, self.separation,
                                     (self.n_classes, self.clusters, self.n_features))
            labels = rng.integers(0, self.n_classes, n)
            cluster = rng.integers(0, self.clusters, n)
            X = centres[labels, cluster] + rng.standard_normal((n, self.n_features))
            return X.astype(np.float32), labels.astype(np.int32)
        teacher = problem.normal(0.0, 1.0 / np.sqrt(self.n_features),
                                 (self.n_features, self.n_targets))
        X = rng.standard_normal((n, self.n_features))
        y = X @ teacher + 0.1 * rng.standard_normal((n, self.n_targets))
        y = y[:, 0] if self.n_targets == 1 else y
        return X.astype(np.float32), y.astype(np.float32)

    def describe(self):
        """JSON text recorded in the file's ``generator`` attribute."""
        return json.dumps({"kind": "synthetic", **self.__dict__}, sort_keys=True)


def write_synthetic(comm, path, problem, n_rows, stream=0, progress=None):
    """Write ``n_rows`` rows of ``problem`` to ``path``; collective over ``comm``.

    Every rank generates and writes its own contiguous range of row blocks (independent
    writes into one file opened with the mpio driver). The file is written under a
    temporary name and renamed when complete, so a crash never leaves a half file at
    ``path``. The bytes do not depend on the number of ranks.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rows_per_block = chunk_rows(problem.n_features, n_rows) * BLOCK_CHUNKS
    n_blocks = -(-n_rows // rows_per_block)
    lo, hi = partition.rank_bounds(n_blocks, comm.Get_size(), comm.Get_rank())
    with h5py.File(tmp, "w", driver="mpio", comm=comm) as f:
        X, y = _create(f, n_rows, problem.n_features, problem.task,
                       problem.n_classes if problem.task == "classification" else 0,
                       problem.n_targets if problem.task == "regression" else 1,
                       {"generator": problem.describe(), "seed": problem.seed, "stream": stream})
        for block in range(lo, hi):
            start = block * rows_per_block
            stop = min(n_rows, start + rows_per_block)
            xb, yb = problem.block(stream, block, start, stop)
            X[start:stop] = xb
            y[start:stop] = yb
            if progress is not None:
                progress(block - lo + 1, hi - lo)
    with h5py.File(tmp, "r+", driver="mpio", comm=comm) as f:   # reopened: every rank's rows on disk
        integrity.add(f, comm)
    comm.Barrier()
    if comm.Get_rank() == 0:
        tmp.replace(path)
    comm.Barrier()


def import_arrays(dst, chunks, n_features, task, source):
    """Write ``(X, y)`` row chunks to a new dataset file ``dst`` (serial, atomic).

    ``task`` is "classification" (``y`` integral, >= 0) or "regression". NaN/Inf or bad
    labels are rejected here with the row number, so a file made by ``import-dataset`` is
    known clean.
    """
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    n_rows = 0
    max_label = -1
    n_targets = None
    try:
        with h5py.File(tmp, "w") as f:
            X = y = None
            for xb, yb in chunks:
                xb = np.asarray(xb, np.float64)
                yb = np.asarray(yb)
                if xb.ndim != 2 or xb.shape[1] != n_features:
                    raise UserError(f"{source}: expected {n_features} feature columns, got shape {xb.shape}")
                bad = ~np.isfinite(xb).all(axis=1)
                if task == "classification":
                    yf = yb if yb.dtype.kind in "iu" else yb.astype(np.float64)
                    bad |= _invalid_labels(yf)
                else:
                    yf = yb.astype(np.float64).reshape(len(yb), -1)
                    bad |= ~np.isfinite(yf).all(axis=1)
                if bad.any():
                    i = int(np.argmax(bad))
                    label = f" (label {yb[i]})" if task == "classification" else ""
                    raise UserError(f"{source}: row {n_rows + i} has NaN/Inf or an invalid label{label}: "
                                    f"labels must be integers in [0, {MAX_CLASSES:,}) "
                                    f"(targets of a regression: --task regression); "
                                    f"fix or drop it before importing")
                if X is None:
                    n_targets = 1 if task == "classification" or yf.ndim == 1 else yf.shape[1]
                    X, y = _create(f, 0, n_features, task, 0, n_targets,
                                   {"generator": json.dumps({"kind": "import", "source": str(source)})},
                                   resizable=True)
                stop = n_rows + len(xb)
                X.resize(stop, axis=0)
                y.resize(stop, axis=0)
                X[n_rows:stop] = xb.astype(np.float32)
                if task == "classification":
                    y[n_rows:stop] = yf.astype(np.int32)
                    max_label = max(max_label, int(yf.max(initial=-1)))
                else:
                    y[n_rows:stop] = (yf[:, 0] if n_targets == 1 else yf).astype(np.float32)
                n_rows = stop
            if n_rows == 0:
                raise UserError(f"{source}: no rows to import")
            f.attrs["n_rows"] = n_rows
            if task == "classification":
                f.attrs["n_classes"] = max(2, max_label + 1)
            integrity.add(f)
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return n_rows


def _invalid_labels(y):
    """Rows whose class label is not an integer in [0, MAX_CLASSES), in ``y``'s own dtype
    (integers are never cast to float, where 2**53 + 1 would round to a valid-looking value)."""
    if y.dtype.kind in "iu":
        return (y < 0) | (y >= MAX_CLASSES)
    return ~np.isfinite(y) | (y < 0) | (y >= MAX_CLASSES) | (y != np.round(y))


class BatchStream:
    """This rank's rows, step after step, read ahead by a background thread.

    Yields ``(epoch, step, global_rows, rows, X, y)`` where ``global_rows`` is the size of
    the step's global batch, ``rows`` this rank's row numbers and ``X``/``y`` their data
    (possibly none), from global step ``start_step`` (after a resume). The rank reads only
    the rows of the lanes it owns (``partition.rank_region``): all of them at once when
    they fit ``memory_budget_bytes`` (``in_memory``), else window by window as its steps
    reach them, about one window per lane read ahead. The rows of a step are the same
    either way. Reads are checked against the file's checksums, if it has them; a mismatch
    is raised as ``integrity.DamagedData`` for the step that needed the rows.
    """

    def __init__(self, info, global_batch, seed, world_size, rank, *, epochs, max_steps=None,
                 start_step=0, prefetch_steps=2, memory_budget_bytes=512 << 20):
        if world_size > global_batch:
            raise UserError(f"{world_size} ranks cannot share a global batch of {global_batch} "
                            f"rows: each rank owns at least one of its lanes")
        self.info = info
        self.global_batch = global_batch
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.epochs = epochs
        self.max_steps = max_steps
        self.start_step = start_step
        self.window = info.window
        self.lanes = partition.rank_bounds(global_batch, world_size, rank)
        self.region = partition.rank_region(info.n_rows, global_batch, world_size, rank)
        n_lanes = self.lanes[1] - self.lanes[0]
        step_bytes = n_lanes * info.row_bytes
        budget = memory_budget_bytes
        if step_bytes > budget:
            raise UserError(f"one step's rows on a rank take {step_bytes / 2**20:.1f} MiB, over "
                            f"[data].memory_budget_mb = {budget / 2**20:.1f}")
        share = (self.region[1] - self.region[0]) * info.row_bytes
        # Held: the share, or each lane's current window and about one more read ahead;
        # then as many steps prefetched as the rest of the budget holds (at most prefetch_steps).
        self.window_rows = window_rows = min(self.window, -(-info.n_rows // global_batch))
        self.in_memory = share + step_bytes <= budget
        self.read_ahead_bytes = 0 if self.in_memory else n_lanes * window_rows * info.row_bytes
        held = share if self.in_memory else 2 * self.read_ahead_bytes
        if held + step_bytes > budget:
            raise UserError(
                f"this rank's share ({share / 2**20:,.1f} MiB) does not fit [data].memory_budget_mb "
                f"= {budget / 2**20:.1f}, and streaming it takes two windows of {window_rows} rows "
                f"for each of its {n_lanes} lanes ({held / 2**20:.1f} MiB): raise the budget or "
                f"run more ranks")
        self.depth = int(max(1, min(prefetch_steps, (budget - held) // step_bytes)))
        self._queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="granger-prefetch", daemon=True)
        self._thread.start()

    def describe(self):
        """One line for the run's log: the rows this rank holds and how."""
        lo, hi = self.region
        how = ("in memory" if self.in_memory else
               f"streamed in windows of {self.window} rows, "
               f"{self.read_ahead_bytes / 2**20:.1f} MiB read ahead")
        return f"rows [{lo:,}, {hi:,}) (lanes {self.lanes[0]}..{self.lanes[1] - 1}), {how}"

    def _epochs(self):
        """``(epoch, first, stop, plan)``: the steps ``[first, stop)`` of each epoch to run."""
        per_epoch = partition.steps_per_epoch(self.info.n_rows, self.global_batch)
        end = self.epochs * per_epoch
        if self.max_steps is not None:
            end = min(end, self.max_steps)
        for epoch in range(self.start_step // per_epoch, -(-end // per_epoch)):
            first = max(self.start_step, epoch * per_epoch) - epoch * per_epoch
            stop = min(end, (epoch + 1) * per_epoch) - epoch * per_epoch
            if first < stop:
                yield epoch, first, stop, partition.EpochPlan.make(
                    self.info.n_rows, self.global_batch, self.seed, epoch, window=self.window,
                    world_size=self.world_size, rank=self.rank)

    def _produce(self):
        item = None
        try:
            # No chunk cache: windows are smaller than a chunk and come in no chunk order, so
            # a cache would read a whole chunk for each (four times the bytes, measured).
            with h5py.File(self.info.path, "r", rdcc_nbytes=0, rdcc_nslots=1) as f:
                checker, source = integrity.Checker(f, self.info.path), None
                for epoch, first, stop, plan in self._epochs():
                    entering = None
                    for step in range(first, stop):
                        lanes = plan.lanes_at(step)
                        rows = plan.order[lanes, step]
                        item = (epoch, step, plan.batch_len(step), rows)
                        if source is None:    # here, so that damage found loading has a step
                            source = (_Region(checker, *self.region) if self.in_memory else
                                      _Windows(checker, self._epochs(), self._stop, self.lanes,
                                               self.window_rows))
                        if entering is None:
                            entering = source.epoch(plan, first, stop)
                        X, y = source.rows(entering.get(step, ()), lanes, rows)
                        if not _put(self._queue, self._stop, item + (
                                np.ascontiguousarray(X, np.float32), self._targets(y, rows.size))):
                            return
        except _Stopped:
            return
        except BaseException as exc:  # handed to the consumer, raised there
            if isinstance(exc, integrity.DamagedData):
                exc.step_item = item
            _put(self._queue, self._stop, exc)
            return
        _put(self._queue, self._stop, None)

    def _targets(self, y, n):
        if self.info.task == "classification":
            return labels_as_int32(y, self.info.n_classes)
        return np.ascontiguousarray(y, np.float32).reshape(n, self.info.n_targets)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self):
        """Stop the reader threads (safe to call twice)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _put(q, stop, item):
    """Put ``item`` into ``q`` unless ``stop`` is set first; True if it went in."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


class _Stopped(Exception):
    """The stream was closed while a reader waited."""


def _get(q, stop):
    """The next item of ``q``; ``_Stopped`` once ``stop`` is set."""
    while not stop.is_set():
        try:
            return q.get(timeout=0.1)
        except queue.Empty:
            continue
    raise _Stopped


class _Region:
    """A rank's whole region in memory, read once in large checked pieces."""

    PIECE_BYTES = 8 << 20      # the transient copy a piece's read makes

    def __init__(self, checker, lo, hi):
        self.lo = lo
        X, y = checker.X, checker.y
        self.X = np.empty((hi - lo,) + X.shape[1:], X.dtype)
        self.y = np.empty((hi - lo,) + y.shape[1:], y.dtype)
        piece = max(1, self.PIECE_BYTES // (X.dtype.itemsize * X.shape[1]))
        for a in range(lo, hi, piece):
            b = min(hi, a + piece)
            self.X[a - lo:b - lo], self.y[a - lo:b - lo] = checker.read(a, b)

    def epoch(self, plan, first, stop):
        """Nothing to load at any step: the whole region is held."""
        return {}

    def rows(self, entering, lanes, rows):
        return self.X[rows - self.lo], self.y[rows - self.lo]


class _Windows:
    """A rank's region streamed: each lane's current window in a slot of one array, and the
    next windows read ahead by a thread in the order the steps enter them (a pure function
    of the plans, so the reader knows it without asking). Windows are contiguous hyperslabs."""

    def __init__(self, checker, epochs, stop, lanes, window_rows):
        self.checker, self.stop, self.lane_lo = checker, stop, lanes[0]
        n_lanes = lanes[1] - lanes[0]
        X, y = checker.X, checker.y
        self.X = np.empty((n_lanes, window_rows) + X.shape[1:], X.dtype)
        self.y = np.empty((n_lanes, window_rows) + y.shape[1:], y.dtype)
        self.lo = np.zeros(n_lanes, np.int64)     # the rows [lo, hi) each slot holds
        self.hi = np.zeros(n_lanes, np.int64)
        self.early = {}            # slot -> its next window, read before its turn
        self.ready = queue.Queue(maxsize=n_lanes)
        self.thread = threading.Thread(target=self._read, args=(epochs,), name="granger-windows",
                                       daemon=True)
        self.thread.start()

    @staticmethod
    def entered(plan, first, stop):
        """``(step, lane, lo, hi)`` of each window the steps ``[first, stop)`` of ``plan``
        enter, in that order: a window is a run of one block's rows in a lane's order."""
        out = []
        for i, order in enumerate(plan.order):
            order = order[order >= 0]
            blocks = order // plan.window
            starts = np.flatnonzero(np.r_[True, blocks[1:] != blocks[:-1]])
            ends = np.r_[starts[1:], order.size]
            lane = plan.lane_lo + i
            lane_lo = partition.lane_start(plan.n_rows, plan.global_batch, lane)
            lane_hi = partition.lane_start(plan.n_rows, plan.global_batch, lane + 1)
            for s, e in zip(starts, ends):
                if e > first and s < stop:
                    b = int(blocks[s])
                    out.append((max(int(s), first), lane, max(lane_lo, b * plan.window),
                                min(lane_hi, (b + 1) * plan.window)))
        out.sort()
        return out

    def _read(self, epochs):
        try:
            for _, first, stop, plan in epochs:
                for _, lane, lo, hi in self.entered(plan, first, stop):
                    item = (lane - self.lane_lo, lo, hi) + tuple(self.checker.read(lo, hi))
                    if not _put(self.ready, self.stop, item):
                        return
        except BaseException as exc:
            _put(self.ready, self.stop, exc)

    def _load(self, slot):
        """Fill ``slot`` with its lane's next window (others read before it wait in ``early``)."""
        item = self.early.pop(slot, None)
        while item is None:
            got = _get(self.ready, self.stop)
            if isinstance(got, BaseException):
                raise got
            if got[0] == slot:
                item = got
            else:                  # another lane's next window, needed at this step too
                self.early[got[0]] = got
        _, lo, hi, X, y = item
        self.lo[slot], self.hi[slot] = lo, hi
        self.X[slot, :hi - lo], self.y[slot, :hi - lo] = X, y

    def epoch(self, plan, first, stop):
        """``{step: slots}``: the lanes (as slots) entering a new window at each step."""
        entering = {}
        for step, lane, _, _ in self.entered(plan, first, stop):
            entering.setdefault(step, []).append(lane - self.lane_lo)
        return entering

    def rows(self, entering, lanes, rows):
        """The rows of a step, after loading the windows the step enters (by the plan, not
        by the rows: an epoch may start in the block the last one ended in)."""
        for slot in entering:
            self._load(slot)
        offsets = rows - self.lo[lanes]
        return self.X[lanes, offsets], self.y[lanes, offsets]
