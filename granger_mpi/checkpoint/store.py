"""A run's checkpoint directory: the ``latest`` index, deleting checkpoints beyond
``keep_last`` (in a helper thread a save need not wait for), setting aside those of an
abandoned branch (``abandoned/``), and finding the newest good one of the indexed branch."""

import errno
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from granger_mpi.checkpoint.format import NAME, checkpoint_dir, file_name, verify
from granger_mpi.errors import UserError

ABANDONED = "abandoned"     # checkpoints of a branch left by a resume from an earlier one

class CheckpointStore:
    """The directory ``RUN_DIR/ckpt``: staging and publishing the index, and pruning in a
    thread of its own (started on first use). ``close()`` waits for the pruning and ends
    the thread; a closed store starts a new one when used again."""

    STAGED = "latest.tmp"    # the index that will point at the new checkpoint, written during its fsync

    def __init__(self, run_dir):
        self.directory = checkpoint_dir(run_dir)
        self._pruner = None
        self._pruning = None

    def stage_index(self, step, keep_last):
        """Write the index that will point at ``step`` as ``latest.tmp``. Returns the
        checkpoints to delete once ``latest`` points at ``step``: those beyond the newest
        ``keep_last``."""
        return _stage_index(self.directory, step, keep_last, self.STAGED)

    def publish(self, step, doomed):
        """Rename the verified ``step_XXXXXXXX.h5.tmp`` to its final name and ``latest.tmp``
        over ``latest``, make both renames durable with one fsync of the directory, then
        start deleting ``doomed`` in the helper thread (unlinking a GiB file takes a good
        part of a second, which training need not wait for; the next save waits for it).
        Names are resolved through one descriptor of the directory, the one fsynced."""
        name = file_name(step)
        dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.replace(name + ".tmp", name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.replace(self.STAGED, "latest", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
            _abandon_above(self.directory, dir_fd, step)
        finally:
            os.close(dir_fd)
        if doomed:
            if self._pruner is None:
                self._pruner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-prune")
            self._pruning = self._pruner.submit(_delete, doomed)

    def wait_for_pruning(self):
        """Wait until the checkpoints beyond ``keep_last`` are deleted."""
        if self._pruning is not None:
            self._pruning.result()
            self._pruning = None

    def close(self):
        self.wait_for_pruning()
        if self._pruner is not None:
            self._pruner.shutdown()
            self._pruner = None


_stores = {}    # the store of each checkpoint directory this process saved into


def store(run_dir) -> CheckpointStore:
    """The ``CheckpointStore`` of ``run_dir`` (one per directory and process)."""
    key = Path(checkpoint_dir(run_dir)).resolve()
    if key not in _stores:
        _stores[key] = CheckpointStore(run_dir)
    return _stores[key]


def discard(run_dir):
    """Delete a run's checkpoints and index (``--overwrite``). A ``ckpt`` that is a symlink
    (checkpoints on scratch) is cleared through the link and kept; only names of the
    checkpoint layout are deleted there, nothing else the target holds. ``OSError`` if
    one cannot be deleted."""
    directory = Path(checkpoint_dir(run_dir))
    if not directory.exists():
        return
    for entry in directory.iterdir():
        name = entry.name.removesuffix(".tmp")
        if NAME.match(name) or name == "latest":
            entry.unlink()
    for entry in abandoned(run_dir):
        entry.unlink()
    if (directory / ABANDONED).is_dir() and not any((directory / ABANDONED).iterdir()):
        (directory / ABANDONED).rmdir()
    if not directory.is_symlink() and not any(directory.iterdir()):
        directory.rmdir()


def wait_for_pruning():
    """Wait until every store's old checkpoints are deleted."""
    for each in _stores.values():
        each.wait_for_pruning()


def finish_run():
    """Before a process that saved ends: wait for every store's pruning and end its thread."""
    for each in _stores.values():
        each.close()


def _delete(paths):
    """Delete old checkpoints; one that cannot be is left, with a warning: the run's newer
    checkpoints are good, so this is no reason to stop it."""
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            print(f"granger-mpi: warning: could not delete old checkpoint {path} "
                  f"({exc.strerror or exc}); left in place", file=sys.stderr, flush=True)


def _stage_index(directory, step, keep_last, staged):
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        entries = os.listdir(dir_fd)
        for entry in entries:    # a save in flight is this one: any other .tmp is a torn one
            m = NAME.match(entry.removesuffix(".tmp"))
            if entry.endswith(".tmp") and m and int(m.group(1)) != step:
                _delete([directory / entry])
        steps = sorted({step} | {int(m.group(1)) for entry in entries if (m := NAME.match(entry))})
        keep = [s for s in steps if s <= step][-keep_last:]
        index = {"latest": file_name(step), "step": step, "kept": [file_name(s) for s in keep]}
        _write_new(staged, (json.dumps(index, indent=1) + "\n").encode(), dir_fd)
    finally:
        os.close(dir_fd)
    return [directory / file_name(s) for s in steps if s not in keep and s < step]


def _abandon_above(directory, dir_fd, step):
    """Move the checkpoints above ``step`` into ``abandoned/``: they belong to a branch
    that a resume from an earlier checkpoint left (the user rolled back), which the index
    no longer names; kept for the user, never deleted."""
    above = [entry for entry in os.listdir(dir_fd) if (m := NAME.match(entry)) and int(m.group(1)) > step]
    if not above:
        return
    (directory / ABANDONED).mkdir(exist_ok=True)
    for entry in above:
        os.replace(entry, f"{ABANDONED}/{entry}", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def abandoned(run_dir):
    """The checkpoints set aside in ``ckpt/abandoned/``, oldest first."""
    directory = Path(checkpoint_dir(run_dir)) / ABANDONED
    return sorted(p for p in directory.iterdir() if NAME.match(p.name)) if directory.is_dir() else []


def _write_new(name, data, dir_fd):
    """Write ``data`` to the file ``name`` in the directory open as ``dir_fd`` (truncated)."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
    try:
        if os.write(fd, data) != len(data):     # a regular file: short only when full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    finally:
        os.close(fd)


def candidates(run_dir):
    """Checkpoint files of a run, newest first. With an index (``latest``), only those of
    the branch it names: its step and below (a file above it is a branch the user rolled
    back from, or a save whose index never got published); without one, all."""
    directory = checkpoint_dir(run_dir)
    if not directory.is_dir():
        return []
    found = sorted(((int(m.group(1)), p) for p in directory.iterdir() if (m := NAME.match(p.name))),
                   reverse=True)
    try:
        newest = int(json.loads((directory / "latest").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        newest = None
    return [p for step, p in found if newest is None or step <= newest]


def newest_good(run_dir, report=print):
    """The newest checkpoint that verifies; each bad one is reported and skipped.

    None only when the run has no checkpoint at all (no file, nothing in ``ckpt/latest``):
    a run that ended before its first save starts again from step 0. When it has
    checkpoints and none verifies (torn, bit-rotted, purged from scratch), ``UserError``
    names each and why: starting over would overwrite the run's metrics and model.
    """
    failed = []
    for path in candidates(run_dir):
        problems = verify(path)
        if not problems:
            return path
        report(f"skipping checkpoint {path}: {problems[0]}")
        reason = problems[0].removeprefix(f"{path}: ").replace(f"checkpoint {path} is ", "")
        failed.append(f"{path.name}: {reason}")
    failed += _indexed_but_missing(checkpoint_dir(run_dir))
    if not failed:
        return None
    raise UserError(f"--resume auto: {checkpoint_dir(run_dir)} holds checkpoints but none verifies "
                    f"({'; '.join(failed)}); not starting again from step 0 over this run: "
                    f"resume with --resume PATH, or start anew with --overwrite")


def _indexed_but_missing(directory):
    """What ``latest`` names that is not there, each as a reason (an unreadable index is one)."""
    try:
        index = json.loads((directory / "latest").read_text())
        named = {index["latest"], *index.get("kept", ())}
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [f"latest: unreadable index ({exc})"]
    return [f"{name}: named in latest but missing" for name in sorted(named, reverse=True)
            if not (directory / name).exists()]
