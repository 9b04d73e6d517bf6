"""Reading foreign formats (.npz, .npy pairs, .csv) into granger-mpi datasets.

Nothing executable is loaded: ``.npy``/``.npz`` are read with ``allow_pickle=False``.
CSV files are streamed in blocks, so they may be larger than memory.
"""

import csv
import itertools
import zipfile
from pathlib import Path

import numpy as np

from granger_mpi.data import dataset
from granger_mpi.errors import UserError

CSV_BLOCK_ROWS = 65536


def _load_npy(path, what):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"{what} file {path} not found") from None
    except (ValueError, OSError) as exc:
        raise UserError(f"{what} file {path} is not a numeric .npy array ({exc})") from None


def _npz_arrays(path, x_key, y_key):
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f"source file {path} not found") from None
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise UserError(f"source file {path} is not a readable .npz archive ({exc})") from None
    with archive:
        for key in (x_key, y_key):
            if key not in archive.files:
                raise UserError(f"{path} has no array {key!r} (it holds {', '.join(archive.files)}); "
                                f"choose with --x-key/--y-key")
        return archive[x_key], archive[y_key]


def _infer_task(y, task):
    if task != "auto":
        return task
    values = np.asarray(y, np.float64)
    integral = values.ndim == 1 and np.all(np.isfinite(values)) and np.all(values == np.round(values)) \
        and values.min(initial=0) >= 0
    return "classification" if integral else "regression"


def _row_blocks(X, y, block=CSV_BLOCK_ROWS):
    for start in range(0, X.shape[0], block):
        yield np.asarray(X[start:start + block]), np.asarray(y[start:start + block])


def _import_arrays(X, y, output, task, source):
    if X.ndim != 2:
        raise UserError(f"{source}: features must be a 2-D array (rows x features), got shape {X.shape}")
    if y.shape[:1] != X.shape[:1]:
        raise UserError(f"{source}: {X.shape[0]} feature rows but {y.shape[0] if y.ndim else 0} targets")
    return dataset.import_arrays(output, _row_blocks(X, y), X.shape[1], _infer_task(y, task), source)


def _csv_blocks(path, label_column):
    """``(X, y)`` float blocks of a CSV; the first row is a header if it is not numeric."""
    with open(path, newline="") as fh:
        reader = csv.reader(fh)
        first = next(reader, None)
        if first is None:
            raise UserError(f"{path} is empty")
        line = 1
        rows = reader
        try:
            [float(v) for v in first]
            rows = itertools.chain([first], reader)
        except ValueError:
            line = 2  # a header row
        width = len(first)
        column = label_column % width if -width <= label_column < width else None
        if column is None:
            raise UserError(f"--label-column {label_column} is outside the {width} columns of {path}")
        while True:
            block = list(itertools.islice(rows, CSV_BLOCK_ROWS))
            if not block:
                return
            try:
                values = np.array(block, np.float64)
            except ValueError:
                bad = next(i for i, r in enumerate(block) if len(r) != width or not _numeric(r))
                raise UserError(f"{path}: line {line + bad} is not {width} numeric fields: "
                                f"{','.join(block[bad])[:80]!r}") from None
            line += len(block)
            yield np.delete(values, column, axis=1), values[:, column]


def _numeric(row):
    try:
        [float(v) for v in row]
        return True
    except ValueError:
        return False


def import_file(source, output, *, labels=None, label_column=-1, task="auto", x_key="X", y_key="y"):
    """Convert ``source`` to the dataset file ``output``; returns the number of rows."""
    source, output = Path(source), Path(output)
    if not output.parent.is_dir():
        raise UserError(f"output directory {output.parent} does not exist")
    suffix = source.suffix.lower()
    if suffix == ".npz":
        X, y = _npz_arrays(source, x_key, y_key)
        return _import_arrays(X, y, output, task, source)
    if suffix == ".npy":
        if labels is None:
            raise UserError(f"{source} holds features only: give the targets with --labels LABELS.npy")
        return _import_arrays(_load_npy(source, "features"), _load_npy(labels, "labels"), output, task, source)
    if suffix == ".csv":
        if not source.is_file():
            raise UserError(f"source file {source} not found")
        if task == "auto":  # decide from the targets: one streaming pass over the file
            task = _infer_task(np.concatenate([y for _, y in _csv_blocks(source, label_column)]), "auto")
        blocks = _csv_blocks(source, label_column)
        first_X, first_y = next(blocks)
        return dataset.import_arrays(output, itertools.chain([(first_X, first_y)], blocks),
                                     first_X.shape[1], task, source)
    raise UserError(f"{source}: unknown format {suffix!r}; use .npz, .npy (with --labels) or .csv")
