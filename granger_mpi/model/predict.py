"""Predictions of a saved model for the rows of a dataset, written to one HDF5 file.

Layout of the output (``h5dump`` reads it): ``/outputs`` (rows x outputs, float32: logits
or regression values); for classification also ``/labels`` (int32, the predicted class)
and ``/probabilities`` (rows x classes, float32). Root attributes: ``format``, ``model``
(JSON), ``source`` (the model file or checkpoint), ``data``.
"""

import json
from pathlib import Path

import h5py
import numpy as np

from granger_mpi.data import partition
from granger_mpi.errors import UserError
from granger_mpi.storage.h5files import open_for_reading

FORMAT = "granger-mpi predictions"


def check_features(path, model):
    """Rows and features of ``/X`` in ``path``; ``UserError`` unless they fit ``model``."""
    with open_for_reading(path, "dataset file") as f:
        if "X" not in f or not isinstance(f["X"], h5py.Dataset) or f["X"].ndim != 2:
            raise UserError(f"dataset file {path} has no 2-D dataset /X")
        n_rows, n_features = f["X"].shape
    if n_features != model.sizes[0]:
        raise UserError(f"{path}: /X has {n_features} features, the model takes {model.sizes[0]}")
    return n_rows


def probabilities(model, outputs):
    """Class probabilities from raw outputs: softmax, or the two classes of a logistic model."""
    z = outputs.astype(np.float64)
    if model.binary:
        p = 1.0 / (1.0 + np.exp(-z[:, 0]))
        return np.stack([1.0 - p, p], axis=1).astype(np.float32)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def write(comm, model, params, data_path, out_path, *, source, chunk_rows=65536):
    """Predict every row of ``data_path`` into ``out_path``; collective over ``comm``.

    Every rank reads and predicts a contiguous share of the rows and writes it into one
    file (mpio driver, created under a temporary name and renamed when complete).
    Returns the number of rows.
    """
    out_path = Path(out_path)
    n_rows = check_features(data_path, model)
    lo, hi = partition.rank_bounds(n_rows, comm.Get_size(), comm.Get_rank())
    classification = model.task == "classification"
    n_classes = 2 if model.binary else model.sizes[-1]
    tmp = out_path.with_name(out_path.name + ".tmp")
    with h5py.File(data_path, "r") as src, h5py.File(tmp, "w", driver="mpio", comm=comm) as out:
        outputs = out.create_dataset("outputs", (n_rows, model.sizes[-1]), np.float32)
        if classification:
            labels = out.create_dataset("labels", (n_rows,), np.int32)
            probs = out.create_dataset("probabilities", (n_rows, n_classes), np.float32)
        out.attrs["format"] = FORMAT
        out.attrs["model"] = json.dumps(model.spec())
        out.attrs["source"] = str(source)
        out.attrs["data"] = str(data_path)
        for start in range(lo, hi, chunk_rows):
            stop = min(hi, start + chunk_rows)
            X = np.ascontiguousarray(src["X"][start:stop], np.float32)
            raw = model.predict(params, X)
            outputs[start:stop] = raw
            if classification:
                labels[start:stop] = model.predict_labels(raw)
                probs[start:stop] = probabilities(model, raw)
    comm.Barrier()
    if comm.Get_rank() == 0:
        tmp.replace(out_path)
    comm.Barrier()
    return n_rows
