"""A corruption fuzzer for checkpoints and model files (``test_corruption``, and
``scripts/fuzz-checkpoints`` for long runs).

Each mutation damages a copy of a real file: flipped bits, a truncation, a zeroed block,
two datasets of the same shape swapped (their links, or their bytes), an attribute edited
or deleted. It is then classified by reading the copy back with plain h5py: a mutation
that leaves every dataset and attribute identical (free space, padding) is benign; any
other is harmful and must be rejected by all the readers that take the file:

* ``checkpoint.verify`` (what ``inspect --verify`` prints),
* ``checkpoint.newest_good`` (what ``--resume auto`` takes), which must fall back to the
  previous good checkpoint (checkpoints only),
* ``modelfile.load`` (what ``evaluate`` and ``predict`` load),

each naming the file.
"""

import itertools
import json
import os
import select
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from granger_mpi import checkpoint
from granger_mpi.errors import UserError
from granger_mpi.model import modelfile
from granger_mpi.storage import seal


def contents(path):
    """Every dataset (bytes, shape, dtype) and attribute (root and per dataset) of a file as
    plain h5py reads them, or None when it cannot read them all."""
    try:
        with h5py.File(path, "r") as f:
            out = {"/": _attrs(f)}

            def visit(name, node):
                if isinstance(node, h5py.Dataset):
                    data = node[()]
                    out[name] = (data.shape, data.dtype.str, np.asarray(data).tobytes(), _attrs(node))
                else:
                    out[name] = _attrs(node)
            f.visititems(visit)
        return out
    except Exception:  # noqa: BLE001 - any failure to read is a damaged file
        return None


def _attrs(node):
    return {key: (type(value).__name__, np.asarray(value).tobytes() if not isinstance(value, str) else value)
            for key, value in node.attrs.items()}


def _flip(rng, data):
    for offset in rng.integers(0, len(data), rng.integers(1, 9)):
        data[offset] ^= 1 << int(rng.integers(0, 8))
    return "flipped bits"


def _truncate(rng, data):
    del data[int(rng.integers(0, len(data))):]
    return "truncated"


def _zero(rng, data):
    size = int(rng.choice([8, 64, 512, 4096]))
    lo = int(rng.integers(0, max(1, len(data) - size)))
    data[lo:lo + size] = bytes(len(data[lo:lo + size]))
    return f"zeroed {size} bytes"


BYTE_MUTATIONS = [_flip, _truncate, _zero]


def _same_shape_pair(rng, f):
    shapes = {name: f[name].shape for name in _datasets(f)}
    pairs = [(a, b) for a, b in itertools.combinations(sorted(shapes), 2) if shapes[a] == shapes[b]]
    return pairs[int(rng.integers(len(pairs)))] if pairs else (None, None)


def _swap_links(rng, f):
    a, b = _same_shape_pair(rng, f)
    if a is None:
        return None
    f.move(a, "swapping")
    f.move(b, a)
    f.move("swapping", b)
    return f"swapped /{a} and /{b}"


def _swap_bytes(rng, f):
    a, b = _same_shape_pair(rng, f)
    if a is None:
        return None
    x, y = f[a][()], f[b][()]
    if np.array_equal(x, y):
        return None
    f[a][...], f[b][...] = y, x
    return f"swapped the bytes of /{a} and /{b}"


def _edit_attribute(rng, f):
    nodes = [f] + [f[name] for name in _datasets(f)]
    node = nodes[int(rng.integers(len(nodes)))] if rng.random() < 0.3 else f
    keys = sorted(node.attrs)
    key = keys[int(rng.integers(len(keys)))]
    value = node.attrs[key]
    where = f"{node.name}:{key}"
    if rng.random() < 0.15:
        del node.attrs[key]
        return f"deleted attribute {where}"
    if isinstance(value, str):
        if not value:
            node.attrs[key] = "x"
        else:
            i = int(rng.integers(len(value)))
            node.attrs[key] = value[:i] + ("0" if value[i] != "0" else "1") + value[i + 1:]
    else:
        node.attrs[key] = np.asarray(value) + 1
    return f"edited attribute {where}"


HDF5_MUTATIONS = [_swap_links, _swap_bytes, _edit_attribute]


def _datasets(f):
    found = []
    f.visititems(lambda name, node: found.append(name) if isinstance(node, h5py.Dataset) else None)
    return found


def mutate(rng, source, target):
    """Write a mutated copy of ``source`` to ``target``; returns ``(kind, what was done)``,
    what being None when the mutation chosen could not change anything."""
    kinds = BYTE_MUTATIONS + HDF5_MUTATIONS
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind in BYTE_MUTATIONS:
        data = bytearray(Path(source).read_bytes())
        what = kind(rng, data)
        Path(target).write_bytes(bytes(data))
    else:
        shutil.copyfile(source, target)
        with h5py.File(target, "r+") as f:
            what = kind(rng, f)
    return kind.__name__.strip("_"), what


@dataclass
class Tally:
    benign: int = 0
    harmful: int = 0
    accepted: list = field(default_factory=list)   # (mutation, reader): the failures
    crashed: list = field(default_factory=list)    # (mutation, how, copy): a reader's HDF5 aborted or hung
    kinds: dict = field(default_factory=dict)

    def __str__(self):
        return (f"{self.benign + self.harmful} mutations: {self.harmful} harmful, {self.benign} benign; "
                f"harmful accepted: {len(self.accepted)}; a reader crashed or hung in HDF5: {len(self.crashed)}")


def _rejected_by_verify(path):
    return bool(checkpoint.verify(path))


def _rejected_by_load(path):
    try:
        modelfile.load(path)
    except UserError as exc:
        return str(path) in str(exc)
    return False


def _resume_falls_back(run_dir, good):
    reported = []
    try:
        chosen = checkpoint.newest_good(run_dir, report=reported.append)
    except UserError:
        return False
    return chosen == good and any("skipping checkpoint" in line for line in reported)


def _accepted_by(kind, target, run_dir, good):
    """The readers that accepted the harmful mutation ``target``."""
    checks = {"inspect --verify": _rejected_by_verify, "evaluate": _rejected_by_load}
    if kind.endswith("checkpoint"):
        checks["--resume auto"] = lambda _: _resume_falls_back(run_dir, good)
    return [reader for reader, rejected in checks.items() if not rejected(target)]


def _isolated(fn, timeout):
    """``fn()``'s JSON-able result, computed in a forked child: HDF5 can abort or loop forever
    on a damaged file. ``(result, None)``, or ``(None, "crashed ...")`` / ``(None, "hung")``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            os.write(write_end, json.dumps(fn()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    ready, _, _ = select.select([read_end], [], [], timeout)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    with os.fdopen(read_end, "rb") as pipe:
        text = pipe.read() if ready else b""
    _, status = os.waitpid(pid, 0)
    if not ready:
        return None, "hung"
    if os.WIFSIGNALED(status):
        return None, f"crashed ({signal.Signals(os.WTERMSIG(status)).name})"
    return (json.loads(text), None) if text else (None, "exited without a result")


def fuzz(source_run, count, seed, work, timeout=20, progress=None):
    """``count`` mutations of the newest checkpoint and of the model file of the finished
    run ``source_run`` (whose two newest checkpoints are good), sealed as written or
    unsealed (as h5repack leaves them), made in a copy of it under ``work``, each judged in
    a child process (``timeout`` s); returns the ``Tally``. ``progress(n, tally)`` is called
    after each mutation."""
    rng = np.random.default_rng(seed)
    tally = Tally()
    work = Path(work)
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(source_run, run_dir)
    newest = checkpoint.candidates(run_dir)
    target_ckpt, good = newest[0], newest[1]
    pristine = {"checkpoint": target_ckpt, "model": run_dir / "model.h5"}
    for kind, path in list(pristine.items()):
        pristine[kind] = shutil.copyfile(path, work / f"pristine-{kind}.h5")
        pristine[f"unsealed {kind}"] = shutil.copyfile(path, work / f"pristine-unsealed-{kind}.h5")
        with open(pristine[f"unsealed {kind}"], "r+b") as fh:     # as h5repack leaves it
            fh.write(bytes(seal.USER_BLOCK))
    originals = {kind: contents(path) for kind, path in pristine.items()}
    n = 0
    while n < count:
        kind = list(pristine)[int(rng.integers(len(pristine)))]
        target = target_ckpt if kind.endswith("checkpoint") else run_dir / "model.h5"
        mutation, what = mutate(rng, pristine[kind], target)
        if what is None:
            continue
        n += 1
        label = f"{kind}: {what}"
        tally.kinds[mutation] = tally.kinds.get(mutation, 0) + 1
        # plain h5py may crash or hang on it too: then it is harmful
        benign, _ = _isolated(lambda: contents(target) == originals[kind], timeout)
        if benign:
            tally.benign += 1
        else:
            tally.harmful += 1
            accepted, failure = _isolated(lambda: _accepted_by(kind, target, run_dir, good), timeout)
            if failure is not None:     # kept for a look: work/failed-N.h5
                tally.crashed.append((label, failure, str(shutil.copyfile(target, work / f"failed-{n}.h5"))))
            else:
                tally.accepted += [(label, reader) for reader in accepted]
        if progress is not None:
            progress(n, tally)
    shutil.copyfile(pristine["checkpoint"], target_ckpt)
    shutil.copyfile(pristine["model"], run_dir / "model.h5")
    return tally
