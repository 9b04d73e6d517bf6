"""A file's manifest: every dataset and root attribute it must hold, itself checksummed.

A per-dataset CRC catches a flipped bit, but not a dataset swapped with another of the
same shape (each keeps its own CRC), nor an edited attribute (``epoch``, ``job``). So a
checkpoint and a model file also carry, as root attributes:

* ``format_version``: ``FORMAT_VERSION`` (files without it are version 1, before manifests);
* ``manifest``: JSON ``{"datasets": {path: {"shape", "dtype", "crc32"}}, "attributes":
  {name: crc32 of its value}}``, covering every root attribute but these two;
* ``manifest_crc32``: the CRC32 of the manifest's text.

A file is good when it holds exactly the listed datasets, each with its shape, dtype and
CRC, and exactly the listed attributes, each with its value.
"""

import json
import zlib
from collections.abc import Mapping

import h5py
import numpy as np

from granger_mpi.storage.checksums import crc32

FORMAT_VERSION = 2
KEYS = ("manifest", "manifest_crc32")


def value_crc(value) -> int:
    """CRC32 of an attribute's value as HDF5 stores it (type, shape and bytes; a string by
    its text), the same for the value written and the value read back."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "surrogateescape")
    if isinstance(value, str):
        return zlib.crc32(b"str:" + value.encode("utf-8", "surrogateescape"))
    array = np.asarray(value)
    return zlib.crc32(f"{array.dtype.str}{array.shape}:".encode() + array.tobytes())


def build(datasets: Mapping, attributes: Mapping) -> dict:
    """The root attributes ``KEYS`` for a file holding ``datasets`` (path -> (shape, dtype,
    crc32)) and root ``attributes`` (name -> value, ``format_version`` among them)."""
    text = json.dumps({
        "datasets": {path: {"shape": [int(n) for n in shape], "dtype": np.dtype(dtype).str, "crc32": int(crc)}
                     for path, (shape, dtype, crc) in datasets.items()},
        "attributes": {name: value_crc(value) for name, value in sorted(attributes.items())}})
    return {"manifest": text, "manifest_crc32": zlib.crc32(text.encode())}


def rewrite(f) -> None:
    """Make ``format_version``, each dataset's ``crc32`` and the manifest those of what the
    h5py file ``f`` (open for writing) holds now: a model file just written
    (``modelfile.save``), or a file of version 1 once checked (``inspect --migrate``)."""
    found = datasets(f)
    listed = {}
    for name, dset in found.items():
        crc = crc32(dset[()])
        dset.attrs["crc32"] = crc
        listed[name] = (dset.shape, dset.dtype, crc)
    for key in KEYS:
        f.attrs.pop(key, None)
    f.attrs["format_version"] = FORMAT_VERSION
    for key, value in build(listed, dict(f.attrs)).items():
        f.attrs[key] = value


def datasets(f) -> dict:
    """Every dataset in the h5py file (or group) ``f``, by path."""
    found = {}

    def visit(name, node):      # (a value returned would end the visit)
        if isinstance(node, h5py.Dataset):
            found[name] = node
    f.visititems(visit)
    return found


def version_problem(attrs: Mapping, path, what: str) -> str | None:
    """Why a file of ``format_version`` ``attrs`` holds cannot be read by this version, or None."""
    version = attrs.get("format_version")
    if version is None:
        return (f"{path}: a {what} of format version 1 (granger-mpi 0.1, before manifests): "
                f"`granger-mpi inspect --migrate {path}` checks it and adds a manifest")
    try:
        version = int(version)
    except (TypeError, ValueError):
        return f"{path}: its attribute 'format_version' is not a number ({version!r})"
    if version > FORMAT_VERSION:
        return (f"{path}: a {what} of format version {version}, written by a newer granger-mpi; "
                f"this one reads up to version {FORMAT_VERSION}")
    if version != FORMAT_VERSION:
        return f"{path}: unknown format version {version}"
    return None


def read(attrs: Mapping, path) -> tuple[dict | None, list[str]]:
    """``(manifest, problems)`` of a file from its root ``attrs``: the manifest's own
    checksum and every root attribute checked against it (no dataset read)."""
    text, stored = attrs.get("manifest"), attrs.get("manifest_crc32")
    if not isinstance(text, str) or stored is None:
        return None, [f"{path}: no manifest (attributes 'manifest' and 'manifest_crc32')"]
    if zlib.crc32(text.encode("utf-8", "surrogateescape")) != _as_int(stored):
        return None, [f"{path}: the manifest does not match its checksum"]
    try:
        manifest = json.loads(text)
        listed, datasets = manifest["attributes"], manifest["datasets"]
        if not isinstance(listed, dict) or not isinstance(datasets, dict):
            raise TypeError("not a mapping")
    except (ValueError, KeyError, TypeError) as exc:
        return None, [f"{path}: the manifest is malformed ({exc})"]
    problems = [f"{path}: attribute {name!r} is missing" for name in listed if name not in attrs]
    for name, value in attrs.items():
        if name in KEYS:
            continue
        if name not in listed:
            problems.append(f"{path}: attribute {name!r} is not in the manifest")
        elif value_crc(value) != listed[name]:
            problems.append(f"{path}: attribute {name!r} differs from the manifest")
    return manifest, problems


def dataset_problems(manifest: dict, found: Mapping, path) -> list[str]:
    """What differs between the manifest's datasets and those ``found`` in the file (path ->
    (shape, dtype, crc32 computed from its bytes, its own ``crc32`` attribute or None))."""
    listed = manifest["datasets"]
    problems = [f"{path}: /{name} is missing" for name in listed if name not in found]
    problems += [f"{path}: /{name} is not in the manifest" for name in found if name not in listed]
    for name, (shape, dtype, crc, stored) in found.items():
        entry = listed.get(name)
        if entry is None:
            continue
        if list(shape) != entry.get("shape") or np.dtype(dtype).str != entry.get("dtype"):
            problems.append(f"{path}: /{name} has shape {tuple(shape)} {np.dtype(dtype)}, the manifest "
                            f"{tuple(entry.get('shape') or ())} {entry.get('dtype')}")
        elif crc != entry.get("crc32"):
            problems.append(f"/{name}: checksum mismatch (manifest {entry.get('crc32')}, computed {crc})")
        elif stored is None:        # its own attribute too (h5dump shows it)
            problems.append(f"/{name}: no crc32 attribute")
        elif stored != crc:
            problems.append(f"/{name}: its crc32 attribute {stored} does not match its bytes")
    return problems


def _as_int(value) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
