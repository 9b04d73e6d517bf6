"""fsync a file in a helper thread while the caller goes on (a checkpoint starts the fsync of
its new file and carries on reading it back meanwhile)."""

import os
from concurrent.futures import ThreadPoolExecutor

_syncer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="checkpoint-fsync")


def start(path, data_only=False):
    """Start fsyncing (``data_only``: fdatasyncing) the file ``path``; returns a function
    that waits for it to end and returns the OSError it ended with, or None (call it once
    or more)."""
    future = _syncer.submit(_sync, path, data_only)
    return future.result


def _sync(path, data_only):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        return exc
    try:
        (os.fdatasync if data_only else os.fsync)(fd)
        return None
    except OSError as exc:
        return OSError(exc.errno, exc.strerror, path)
    finally:
        os.close(fd)
