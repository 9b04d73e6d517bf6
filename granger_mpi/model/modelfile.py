"""Trained models in HDF5: one named dataset per parameter tensor, no pickle anywhere.

``load`` also takes a checkpoint, whose ``/params`` have the same layout.

Layout: ``/params/<name>`` (``W1``, ``b1``, ...); root attributes ``format``,
``model`` (JSON spec), ``job`` (JSON), ``step``, ``epoch``, ``versions`` (JSON).
``h5dump -d /params/W1 model.h5`` shows a layer.
"""

import json
import os
from pathlib import Path

import h5py
import numpy as np

from granger_mpi.errors import UserError
from granger_mpi.model.models import Model
from granger_mpi.storage.checksums import crc32
from granger_mpi.storage.h5files import json_attr, open_for_reading
from granger_mpi.storage.versions import versions_json

FORMAT = "granger-mpi model"
CHECKPOINT_FORMAT = "granger-mpi checkpoint"   # whose /params a model can be loaded from too


def save(path, model, params, *, attrs):
    """Write ``params`` (flat buffer of ``model``) to ``path`` atomically (temp + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["model"] = json.dumps(model.spec())
        f.attrs["versions"] = versions_json()
        for key, value in attrs.items():
            f.attrs[key] = value
        group = f.create_group("params")
        for name, view in model.layout.views(params).items():
            group.create_dataset(name, data=view)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)


def load(path):
    """``(model, flat params, attrs)`` from a model file or a checkpoint (its ``/params``).

    ``UserError`` if it is neither; a checkpoint's tensors are checked against their CRC32.
    """
    path = Path(path)
    with open_for_reading(path, "model file") as f:
        fmt = f.attrs.get("format")
        if fmt not in (FORMAT, CHECKPOINT_FORMAT) or "params" not in f:
            raise UserError(f"{path} is not a granger-mpi model file or checkpoint "
                            f"(no format={FORMAT!r} or {CHECKPOINT_FORMAT!r} attribute)")
        if fmt == CHECKPOINT_FORMAT and f.attrs.get("complete") != 1:
            raise UserError(f"checkpoint {path} is incomplete (the save did not finish)")
        spec = json_attr(f, "model", path)
        try:
            model = Model(spec["kind"], tuple(spec["sizes"]), spec["activation"], spec["task"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: its attribute 'model' does not describe a model "
                            f"({type(exc).__name__}: {exc})") from None
        params = np.empty(model.layout.size, np.float32)
        views = model.layout.views(params)
        for name, view in views.items():
            if name not in f["params"] or f["params"][name].shape != view.shape:
                raise UserError(f"{path}: /params/{name} is missing or has the wrong shape")
            dset = f["params"][name]
            dset.read_direct(view)
            if fmt == CHECKPOINT_FORMAT and crc32(view) != int(dset.attrs.get("crc32", -1)):
                raise UserError(f"checkpoint {path} is damaged: /params/{name}: checksum mismatch")
        attrs = {k: v for k, v in f.attrs.items()}
    return model, params, attrs
