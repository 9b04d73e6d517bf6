"""A whole-file checksum that is checked before HDF5 reads a byte of the file.

HDF5 (1.10.8 here) can crash or loop forever on damaged metadata: a fuzzed checkpoint
made it abort with a double free and hang in the group B-tree code. So checkpoints and
model files are written with a 512-byte HDF5 user block (which HDF5 and h5dump skip), and
once closed, the user block is given the size and CRC32 of every byte after it. A reader
first checks that seal with plain file reads; a file that fails it never reaches HDF5.

A file without a seal (written by granger-mpi 0.1, or rewritten by a tool such as
h5repack, which drops user blocks) is read as before, its manifest still checked.
"""

import json
import os

import numpy as np

from granger_mpi.storage.checksums import crc32

USER_BLOCK = 512
MAGIC = b"granger-mpi seal 1\n"
_CHUNK = 16 << 20


def _crc_after_user_block(fh) -> tuple[int, int]:
    """``(crc32, bytes)`` of the file open as ``fh`` after its user block."""
    fh.seek(USER_BLOCK)
    crc, total = 0, 0
    while chunk := fh.read(_CHUNK):
        crc = crc32(np.frombuffer(chunk, np.uint8), crc)
        total += len(chunk)
    return crc, total


def seal(path) -> None:
    """Write the seal of the closed file ``path`` (created with a ``USER_BLOCK`` user block)."""
    with open(path, "r+b") as fh:
        crc, total = _crc_after_user_block(fh)
        header = MAGIC + json.dumps({"crc32": crc, "bytes": total}).encode() + b"\n"
        fh.seek(0)
        fh.write(header.ljust(USER_BLOCK, b"\0"))
        fh.flush()


def problem(path) -> str | None:
    """Why the file ``path`` does not match its seal, or None (also when it has none)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(USER_BLOCK)
            if not head.startswith(MAGIC):
                return None
            try:
                record = json.loads(head[len(MAGIC):].split(b"\n", 1)[0])
                expected_crc, expected_bytes = int(record["crc32"]), int(record["bytes"])
            except (ValueError, KeyError, TypeError):
                return f"{path}: its seal (the first {USER_BLOCK} bytes) is damaged"
            size = os.fstat(fh.fileno()).st_size - USER_BLOCK
            if size != expected_bytes:
                return f"{path}: {size} bytes after its seal, {expected_bytes} sealed (truncated or grown)"
            crc, _ = _crc_after_user_block(fh)
    except OSError:
        return None     # the HDF5 open that follows says why, naming the file
    if crc != expected_crc:
        return f"{path}: its bytes do not match its seal (stored CRC32 {expected_crc}, computed {crc})"
    return None
