"""Checkpoints: one HDF5 file per save, atomic and self-verifying (docs/architecture.md).

``format`` (the file: layout, ``verify``, ``read``), ``writer`` (``save``, the collective
protocol, ``AsyncSaver``), ``store`` (the directory: index, pruning, the newest good one),
``policy`` (is this step due?).
"""

from granger_mpi.checkpoint.format import (FORMAT, NAME, CheckpointError, Snapshot, checkpoint_dir,
                                           file_name, kind, read, verify)
from granger_mpi.checkpoint.policy import CheckpointPolicy
from granger_mpi.checkpoint.store import (CheckpointStore, abandoned, candidates, discard, finish_run, newest_good,
                                          store, wait_for_pruning)
from granger_mpi.checkpoint.writer import PARALLEL_FROM_BYTES, AsyncSaver, save

__all__ = ["FORMAT", "NAME", "PARALLEL_FROM_BYTES", "AsyncSaver", "CheckpointError", "CheckpointPolicy",
           "CheckpointStore", "Snapshot", "abandoned", "candidates", "checkpoint_dir", "discard", "file_name", "finish_run",
           "kind", "newest_good", "read", "save", "store", "verify", "wait_for_pruning"]
