"""``granger-mpi inspect``: what a checkpoint or model file holds, verified on request."""

import json
import os
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np

from granger_mpi import checkpoint
from granger_mpi.errors import UserError, describe_io_error
from granger_mpi.model import modelfile
from granger_mpi.storage import manifest, seal
from granger_mpi.storage.checksums import crc32
from granger_mpi.storage.h5files import open_for_reading

SCALARS = ("format", "step", "epoch", "step_in_epoch", "world_size", "writers", "seed", "n_rows")


def resolve(path):
    """A file as given, or a run directory's newest checkpoint."""
    path = Path(path)
    if path.is_dir():
        found = checkpoint.candidates(path) or checkpoint.candidates(path.parent)
        if not found:
            raise UserError(f"{path} holds no checkpoint (looked in {checkpoint.checkpoint_dir(path)})")
        return found[0]
    return path


def describe(path):
    """A JSON-able description: attributes and every tensor's shape, dtype, norm and CRC32."""
    with open_for_reading(path, "checkpoint") as f:
        info = {"path": str(path)}
        for key in SCALARS:
            if key in f.attrs:
                value = f.attrs[key]
                info[key] = value.item() if hasattr(value, "item") else value
        for key in ("model", "job", "versions"):
            if key in f.attrs:
                info[key] = json.loads(f.attrs[key])
        tensors = {}

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                data = obj[...]
                tensors[name] = {"shape": list(obj.shape), "dtype": str(obj.dtype),
                                 "norm": float(np.linalg.norm(data.astype(np.float64).ravel())),
                                 "crc32": int(obj.attrs["crc32"]) if "crc32" in obj.attrs else None}
        f.visititems(visit)
        info["tensors"] = tensors
    return info


def _tensors(path):
    with open_for_reading(path, "file") as f:
        out = {}
        f.visititems(lambda n, o: out.__setitem__(n, o[...]) if isinstance(o, h5py.Dataset) else None)
        return out


def diff(a, b):
    """Per tensor: ``{name: {"max_abs": .., "max_rel": .., "equal": bool}}`` or a note."""
    ta, tb = _tensors(a), _tensors(b)
    out = {}
    for name in sorted(set(ta) | set(tb)):
        if name not in ta or name not in tb:
            out[name] = {"note": f"only in {a if name in ta else b}"}
        elif ta[name].shape != tb[name].shape:
            out[name] = {"note": f"shape {ta[name].shape} vs {tb[name].shape}"}
        else:
            x, y = ta[name].astype(np.float64), tb[name].astype(np.float64)
            delta = np.abs(x - y)
            scale = max(np.abs(x).max(initial=0), 1e-30)
            out[name] = {"equal": bool(np.array_equal(ta[name], tb[name])),
                         "max_abs": float(delta.max(initial=0)), "max_rel": float(delta.max(initial=0) / scale)}
    return out


def migrate(path):
    """Bring a format version 1 checkpoint or model file (before manifests) to the current
    version, in place and atomically (a copy, checked, renamed over it): a checkpoint's
    tensors must match their CRC32s first (a model file of version 1 had none to check)."""
    path = Path(path)
    with open_for_reading(path, "file") as f:
        attrs = dict(f.attrs)
        if attrs.get("format") not in (checkpoint.FORMAT, modelfile.FORMAT):
            raise UserError(f"{path} is not a granger-mpi checkpoint or model file")
        if "format_version" in attrs:
            return f"{path} is already of format version {attrs['format_version']}: nothing to migrate"
        if attrs["format"] == checkpoint.FORMAT:
            if attrs.get("complete") != 1:
                raise UserError(f"{path}: incomplete (the save did not finish): not migrated")
            for name, dset in manifest.datasets(f).items():
                if crc32(dset[()]) != dset.attrs.get("crc32"):
                    raise UserError(f"{path}: /{name} does not match its crc32: not migrated")
    tmp = path.with_name(path.name + ".migrating.tmp")
    try:
        shutil.copyfile(path, tmp)
        with h5py.File(tmp, "r+") as f:
            manifest.rewrite(f)
        problems = checkpoint.verify(tmp)
        if problems:
            raise UserError(f"{path}: the migrated copy does not verify ({problems[0]}): not migrated")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(path)
    except OSError as exc:
        raise UserError(f"{path}: could not be migrated ({describe_io_error(exc)}); it is unchanged") from None
    finally:
        tmp.unlink(missing_ok=True)
    return f"{path}: migrated to format version {manifest.FORMAT_VERSION} (a manifest added)"


def main(args, out=sys.stdout):
    """Run the command; returns the exit code."""
    if args.migrate:
        for path in [args.path] + ([args.other] if args.other else []):
            print(migrate(path), file=out)
        return 0
    path = resolve(args.path)
    if Path(args.path).is_dir() and not args.json:
        for each in checkpoint.abandoned(args.path):
            print(f"abandoned      {each} (a branch a resume from an earlier step left)", file=out)
    if args.diff:
        if args.other is None:
            raise UserError("--diff needs two files: inspect --diff A B")
        result = diff(path, resolve(args.other))
        if args.json:
            print(json.dumps(result, indent=1), file=out)
        else:
            for name, row in result.items():
                text = row.get("note") or ("identical" if row["equal"] else
                                          f"max |a-b| {row['max_abs']:.3g}, relative {row['max_rel']:.3g}")
                print(f"{name:<32} {text}", file=out)
        return 0 if all(r.get("equal") for r in result.values()) else 1
    broken = seal.problem(path)
    if broken and args.verify:      # HDF5 is kept from it: damaged metadata can crash HDF5
        print(json.dumps({"path": str(path), "verify": [broken]}, indent=1) if args.json else
              f"BAD  {broken}\nverify: 1 problem(s)", file=out)
        return 1
    if broken:
        print(f"WARNING: {broken}; what follows is read from a damaged file", file=sys.stderr)
    info = describe(path)
    problems = checkpoint.verify(path) if args.verify else []
    if args.json:
        if args.verify:
            info["verify"] = problems or "ok"
        print(json.dumps(info, indent=1), file=out)
    else:
        for key in SCALARS:
            if key in info:
                print(f"{key:<14} {info[key]}", file=out)
        if "model" in info:
            print(f"{'model':<14} {info['model']}", file=out)
        print(f"{'tensor':<28}{'shape':>14}{'dtype':>9}{'norm':>13}{'crc32':>12}", file=out)
        for name, t in info["tensors"].items():
            print(f"{name:<28}{str(tuple(t['shape'])):>14}{t['dtype']:>9}{t['norm']:>13.6g}"
                  f"{t['crc32'] if t['crc32'] is not None else '-':>12}", file=out)
        if args.verify:
            for line in problems:
                print(f"BAD  {line}", file=out)
            print("verify: ok, every checksum matches" if not problems else
                  f"verify: {len(problems)} problem(s)", file=out)
    return 1 if problems else 0
