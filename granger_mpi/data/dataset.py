"""Datasets: one HDF5 file with float32 features ``/X`` (rows x features) and targets ``/y``.

``/y`` holds int32 class labels (classification) or float32 values, one column per target
(regression). Root attributes describe the problem (``task``, ``n_classes``,
``n_features``, ``n_targets``, ``n_rows``, how it was made). ``/X`` is chunked by rows.

Readers never load a whole file: each rank reads only the rows the partition gives it, a
few steps ahead in a background thread, within a memory budget.
"""

import json
import queue
import threading
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from granger_mpi.data import partition
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

    @property
    def n_outputs(self):
        """Width of a model's output layer for this dataset."""
        return self.n_classes if self.task == "classification" else self.n_targets

    @property
    def row_bytes(self):
        """Bytes of one row as read into memory (float32 features and target)."""
        return 4 * (self.n_features + self.n_targets)


def chunk_rows(n_features, n_rows):
    """Rows per ``/X`` chunk: about ``CHUNK_BYTES``, at least 1, at most ``n_rows``."""
    return int(max(1, min(n_rows, CHUNK_BYTES // (4 * n_features))))


def open_info(path):
    """Check a dataset file and describe it; ``UserError`` names the file and the problem."""
    path = Path(path)
    with open_for_reading(path, "dataset file") as f:
        for name in ("X", "y"):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise UserError(f"dataset file {path} has no /{name} dataset "
                                f"(granger-mpi needs /X rows x features and /y targets)")
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
                n_classes = int(f.attrs["n_classes"])
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
        return DatasetInfo(path, int(X.shape[0]), int(X.shape[1]), task, n_classes, n_targets)


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
    (possibly none). Starts at global step ``start_step`` (after a resume). Memory held is
    at most ``depth`` steps of this rank's rows, plus one copy of the whole file when that
    fits ``memory_budget_bytes`` together with them (``in_memory``): a step's rows are
    scattered over the file, and h5py's point selection costs about 40 us per row, far more
    than the kernels for small models (docs/performance.md, the DDP comparison).
    """

    def __init__(self, info, global_batch, seed, world_size, rank, *, epochs, max_steps=None,
                 start_step=0, prefetch_steps=2, memory_budget_bytes=512 << 20):
        self.info = info
        self.global_batch = global_batch
        self.seed = seed
        self.world_size = world_size
        self.rank = rank
        self.epochs = epochs
        self.max_steps = max_steps
        self.start_step = start_step
        step_bytes = -(-global_batch // world_size) * info.row_bytes
        if step_bytes > memory_budget_bytes:
            raise UserError(f"one step's rows on a rank take {step_bytes / 2**20:.1f} MiB, over "
                            f"[data].memory_budget_mb = {memory_budget_bytes / 2**20:.1f}")
        self.depth = int(max(1, min(prefetch_steps, memory_budget_bytes // step_bytes)))
        self.in_memory = info.n_rows * info.row_bytes + self.depth * step_bytes <= memory_budget_bytes
        self._queue = queue.Queue(maxsize=self.depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="granger-prefetch", daemon=True)
        self._thread.start()

    def _steps(self):
        """``(epoch, step, plan)`` from global step ``start_step`` (a resume) onwards."""
        per_epoch = partition.steps_per_epoch(self.info.n_rows, self.global_batch)
        done = self.start_step
        for epoch in range(self.start_step // per_epoch, self.epochs):
            plan = partition.EpochPlan.make(self.info.n_rows, self.global_batch, self.seed, epoch)
            first = self.start_step - epoch * per_epoch if epoch == self.start_step // per_epoch else 0
            for step in range(first, plan.steps):
                if self.max_steps is not None and done >= self.max_steps:
                    return
                yield epoch, step, plan
                done += 1

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self):
        try:
            with h5py.File(self.info.path, "r") as f:
                X, y = f["X"], f["y"]
                if self.in_memory:   # one sequential read; the steps then index numpy arrays
                    X, y = X[...], y[...]
                for epoch, step, plan in self._steps():
                    batch_len = min(self.global_batch, plan.n_rows - step * self.global_batch)
                    rows = plan.rows(step, self.world_size, self.rank)
                    xb = np.ascontiguousarray(X[rows], np.float32) if rows.size else \
                        np.empty((0, self.info.n_features), np.float32)
                    yb = self._targets(y, rows)
                    if not self._put((epoch, step, batch_len, rows, xb, yb)):
                        return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)
            return
        self._put(None)

    def _targets(self, y, rows):
        if self.info.task == "classification":
            return labels_as_int32(y[rows], self.info.n_classes) if rows.size else np.empty(0, np.int32)
        if not rows.size:
            return np.empty((0, self.info.n_targets), np.float32)
        return np.ascontiguousarray(y[rows], np.float32).reshape(rows.size, self.info.n_targets)

    def __iter__(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self):
        """Stop the reader thread (safe to call twice)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
