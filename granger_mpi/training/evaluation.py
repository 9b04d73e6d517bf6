"""Checks on data and replicas, and the loss of a model on a whole dataset."""

import h5py
import numpy as np
from mpi4py import MPI

from granger_mpi.data import dataset, integrity, partition
from granger_mpi.storage.checksums import crc32
from granger_mpi.errors import UserError
from granger_mpi.kernels import checks
from granger_mpi.mpi.runtime import first_text


def first_bad_row(info: dataset.DatasetInfo, X: np.ndarray, y: np.ndarray) -> int:
    """Index of the first row of a batch with a NaN/Inf or an invalid target, else -1."""
    if info.task == "classification":
        return checks.first_bad_row_classification(X, y, info.n_classes)
    return checks.first_bad_row_regression(X, y)


def bad_row_message(info: dataset.DatasetInfo, row: int) -> str:
    """What is wrong with dataset row ``row`` (found by ``first_bad_row``)."""
    what = f"a label outside [0, {info.n_classes})" if info.task == "classification" else "a NaN/Inf target"
    return f"{info.path}: row {row} has a NaN/Inf feature in /X or {what} in /y"


def report_bad_row(comm: MPI.Comm, info: dataset.DatasetInfo, local_row: int | None, epoch: int,
                   step: int, damage: Exception | None = None):
    """Collective: agree on the first bad row (or damaged block: ``damage``) any rank saw and
    raise the same error everywhere."""
    if damage is not None:
        local = (damage.lo, str(damage))
    elif local_row is not None:
        local = (int(local_row), bad_row_message(info, int(local_row)))
    else:
        local = (np.iinfo(np.int64).max, "")
    _, message = first_text(comm, *local)
    raise UserError(f"{message} (found at epoch {epoch}, step {step}); nothing was saved", agreed=True)


def check_replicas_identical(comm: MPI.Comm, params: np.ndarray, what: str) -> None:
    """Collective: raise if ``params`` differ between ranks (CRC32 of the bytes, gathered)."""
    crc = np.array([crc32(params)], np.int64)
    crcs = np.empty(comm.Get_size(), np.int64)
    comm.Allgather(crc, crcs)
    if np.unique(crcs).size != 1:
        odd = [r for r in range(comm.Get_size()) if crcs[r] != crcs[0]]
        raise RuntimeError(f"{what} differ between ranks (rank 0 vs ranks {odd}): "
                           f"the replicas diverged, which must never happen")


def evaluate(comm: MPI.Comm, model, params: np.ndarray, info: dataset.DatasetInfo,
             chunk_rows: int = 65536) -> tuple[float, float | None]:
    """Mean loss and accuracy (None for regression) of ``params`` on a whole dataset.

    Collective over ``comm``: each rank reads a contiguous share of the rows in chunks,
    checked against the file's checksums. A bad row or a damaged block anywhere raises
    ``UserError`` naming the first one, on every rank.
    """
    lo, hi = partition.rank_bounds(info.n_rows, comm.Get_size(), comm.Get_rank())
    totals = np.zeros(2, np.float64)  # loss sum, correct
    problem = (info.n_rows, "")       # (first bad row, what is wrong with it)
    with h5py.File(info.path, "r") as f:
        checker = integrity.Checker(f, info.path)
        for start in range(lo, hi, chunk_rows):
            stop = min(hi, start + chunk_rows)
            try:
                X, y = checker.read(start, stop)
            except integrity.DamagedData as damage:
                problem = (damage.lo, str(damage))
                break
            X = np.ascontiguousarray(X, np.float32)
            if info.task == "classification":
                y = dataset.labels_as_int32(y, info.n_classes)
            else:
                y = np.ascontiguousarray(y, np.float32).reshape(stop - start, -1)
            bad = first_bad_row(info, X, y)
            if bad >= 0:
                problem = (start + bad, bad_row_message(info, start + bad))
                break
            loss_sum, correct = model.loss(params, X, y)
            totals[0] += loss_sum
            totals[1] += correct
    comm.Allreduce(MPI.IN_PLACE, totals, op=MPI.SUM)
    _, message = first_text(comm, *problem)
    if message:
        raise UserError(f"{message}; cannot evaluate", agreed=True)
    loss = totals[0] / info.n_rows
    return loss, (totals[1] / info.n_rows if info.task == "classification" else None)
