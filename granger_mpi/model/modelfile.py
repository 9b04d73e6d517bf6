"""Trained models in HDF5: one named dataset per parameter tensor, no pickle anywhere.

``load`` also takes a checkpoint, whose ``/params`` have the same layout.

Layout: ``/params/<name>`` (``W1``, ``b1``, ...), each with its ``crc32``; root attributes
``format``, ``format_version``, ``model`` (JSON spec), ``job`` (JSON), ``step``,
``world_size``, ``versions`` (JSON) and the manifest (``storage.manifest``) that covers
them all. ``load`` checks every dataset and attribute against it, a checkpoint's optimizer
state too.
``h5dump -d /params/W1 model.h5`` shows a layer.
"""

import json
import os
from pathlib import Path

import h5py
import numpy as np

from granger_mpi.errors import UserError
from granger_mpi.model import models
from granger_mpi.storage import manifest, seal
from granger_mpi.storage.checksums import crc32
from granger_mpi.storage.h5files import json_attr, open_for_reading
from granger_mpi.storage.versions import versions_json

FORMAT = "granger-mpi model"
CHECKPOINT_FORMAT = "granger-mpi checkpoint"   # whose /params a model can be loaded from too


def save(path, model, params, *, attrs):
    """Write ``params`` (flat buffer of ``model``) to ``path`` atomically (temp + rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w", libver=("v110", "latest"),      # checksummed metadata (h5files)
                   userblock_size=seal.USER_BLOCK) as f:
        for name, view in model.layout.views(params).items():
            f.create_dataset(f"params/{name}", data=view)
        for key, value in {"format": FORMAT, "model": json.dumps(model.spec()),
                           "versions": versions_json(), **attrs}.items():
            f.attrs[key] = value
        manifest.rewrite(f)     # format_version, each tensor's crc32, the manifest
    seal.seal(tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    tmp.replace(path)


def load(path):
    """``(model, flat params, attrs)`` from a model file or a checkpoint (its ``/params``).

    ``UserError`` naming the file if it is neither, or is damaged: every dataset and
    attribute is checked against the manifest.
    """
    path = Path(path)
    if problem := seal.problem(path):
        raise UserError(f"{path} is damaged: {problem.removeprefix(f'{path}: ')}")
    try:
        return _load(path)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as exc:    # h5py's, on damage
        raise UserError(f"{path} is damaged: unreadable ({exc})") from None


def _load(path):
    with open_for_reading(path, "model file") as f:
        fmt = f.attrs.get("format")
        if fmt not in (FORMAT, CHECKPOINT_FORMAT) or "params" not in f:
            raise UserError(f"{path} is not a granger-mpi model file or checkpoint "
                            f"(no format={FORMAT!r} or {CHECKPOINT_FORMAT!r} attribute)")
        attrs = dict(f.attrs)
        if fmt == CHECKPOINT_FORMAT and attrs.get("complete") != 1:
            raise UserError(f"checkpoint {path} is incomplete (the save did not finish)")
        what = "checkpoint" if fmt == CHECKPOINT_FORMAT else "model file"
        if problem := manifest.version_problem(attrs, path, what):
            raise UserError(problem)
        listed, problems = manifest.read(attrs, path)
        if problems:
            raise UserError(f"{what} {path} is damaged: {problems[0].removeprefix(f'{path}: ')}")
        spec = json_attr(f, "model", path)
        try:
            model = models.from_spec(spec)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{path}: its attribute 'model' does not describe a model "
                            f"({type(exc).__name__}: {exc})") from None
        params = np.empty(model.layout.size, np.float32)
        views = model.layout.views(params)
        for name, view in views.items():
            if name not in f["params"] or f["params"][name].shape != view.shape:
                raise UserError(f"{path}: /params/{name} is missing or has the wrong shape")
            f["params"][name].read_direct(view)
        problems = manifest.dataset_problems(listed, _computed(f, views), path)
        if problems:
            raise UserError(f"{what} {path} is damaged: {problems[0].removeprefix(f'{path}: ')}")
    return model, params, attrs


def _computed(f, views):
    """``(shape, dtype, crc32, its crc32 attribute)`` of every dataset in the open file ``f``
    (path -> ...), the parameters' from ``views`` (their bytes as just read), the others
    read whole."""
    found = manifest.datasets(f)
    computed = {}
    for name, dset in found.items():
        data = views.get(name.removeprefix("params/")) if name.startswith("params/") else None
        if data is None or data.shape != dset.shape:
            try:
                data = dset[()]
                crc = crc32(data)
            except (OSError, TypeError, ValueError):    # not numbers, or unreadable
                crc = None
        else:
            crc = crc32(data)
        stored = dset.attrs.get("crc32")
        computed[name] = (dset.shape, dset.dtype, crc, None if stored is None else int(stored))
    return computed
