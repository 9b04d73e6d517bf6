"""``RunDir``: the layout of a run directory, the one place its file names are spelled.

```
RUN_DIR/job.toml        the job file as run
RUN_DIR/model.h5        the final model (/params/<name>)
RUN_DIR/metrics.h5      metric series, per-rank timings, events
RUN_DIR/metrics.jsonl   the same records as JSON lines, when asked for
RUN_DIR/ckpt/           checkpoints (step_XXXXXXXX.h5) and their index (latest)
RUN_DIR/status/         one JSON status file per world rank
RUN_DIR/STOP            written by a user or a batch script: save and stop
RUN_DIR/COMPLETE        the completion record, written after model.h5
RUN_DIR/summary.json    what the run ended with (docs/architecture.md has the schema)
```
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path


def write_json_atomically(path: Path, record: dict) -> None:
    """Write ``record`` as JSON under a temporary name, then rename it over ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def unwritable(path: Path) -> str | None:
    """Why a run directory could not be created or written into, found without writing
    anything (a rejected job leaves no trace), or None."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return "exists and is not a directory"
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot be created: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):   # EROFS even for root
        read_only = os.statvfs(existing).f_flag & os.ST_RDONLY
        return f"cannot be written: {existing} is {'on a read-only file system' if read_only else 'not writable'}"
    return None


@dataclass(frozen=True)
class RunDir:
    """Paths of one run directory (nothing is created by naming them)."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    @property
    def job(self) -> Path:
        return self.path / "job.toml"

    @property
    def model(self) -> Path:
        return self.path / "model.h5"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.h5"

    @property
    def metrics_jsonl(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def ckpt(self) -> Path:
        return self.path / "ckpt"

    @property
    def status(self) -> Path:
        return self.path / "status"

    @property
    def stop(self) -> Path:
        return self.path / "STOP"

    @property
    def complete(self) -> Path:
        return self.path / "COMPLETE"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    def write_completion(self, record: dict) -> None:
        """Atomically record that the run finished (after ``model.h5`` is written)."""
        write_json_atomically(self.complete, record)

    def completion(self) -> dict | None:
        """The completion record, or None."""
        try:
            return json.loads(self.complete.read_text())
        except (OSError, ValueError):
            return None
