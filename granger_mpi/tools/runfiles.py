"""Reading a run directory after (or during) training, without MPI: metrics, events, job, completion.

``plot`` and ``report`` read runs through this module only, so that what a run directory
holds is interpreted in one place (``metrics.h5`` as ``metrics.MetricsFile`` writes it).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from granger_mpi import rundir
from granger_mpi.observe import metrics, timing
from granger_mpi.errors import UserError, describe_io_error


@dataclass
class RunRecord:
    """What a run directory says about its run.

    ``series`` holds one numpy array per ``metrics.FIELDS`` name (equal lengths, one row per
    step); ``events`` one dict per recovery event (``metrics.EVENT_FIELDS``); ``job_text`` the
    job file as run; ``completion`` the ``COMPLETE`` record or None; ``attrs`` the metrics
    file's attributes (``job`` as parsed JSON, ``world_size``); ``timings`` the per-rank time
    windows (``step``, ``steps`` and a windows x world ranks array per ``timing.COLUMNS``
    name), empty if the run recorded none.
    """

    run_dir: Path
    series: dict
    events: list = field(default_factory=list)
    job_text: str = None
    completion: dict = None
    attrs: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    @property
    def steps(self):
        return int(self.series["step"].size)

    @property
    def training_seconds(self):
        """Cumulative step time at the end of each step (checkpoints, recoveries excluded)."""
        return np.cumsum(self.series["step_time_s"])

    def seconds_at_step(self, step):
        """Cumulative step time when step index ``step`` ended (nearest recorded step)."""
        if not self.steps:
            return 0.0
        i = int(np.searchsorted(self.series["step"], step))
        return float(self.training_seconds[min(i, self.steps - 1)])


def read_run(run_dir):
    """The ``RunRecord`` of ``run_dir``; ``UserError`` (exit 2) naming what is missing."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found")
    metrics_path = run_dir / "metrics.h5"
    if not metrics_path.is_file():
        raise UserError(f"{run_dir}: no metrics.h5 (not a run directory, or the run has not "
                        f"started writing metrics)")
    try:
        # Without HDF5's file lock: rank 0 of a live run holds metrics.h5 open for writing,
        # and a reader must not wait for (or be refused by) the run it is looking at.
        f = h5py.File(metrics_path, "r", locking=False)
    except OSError as exc:
        raise UserError(f"metrics file {metrics_path} is not a readable HDF5 file "
                        f"({describe_io_error(exc)})") from None
    with f:
        missing = [name for name in metrics.FIELDS
                   if name not in f and name not in metrics.VALIDATION_FIELDS]
        if missing:
            raise UserError(f"{metrics_path}: datasets {missing} missing (not a granger-mpi "
                            f"metrics file, or from an incompatible version)")
        series = {name: np.asarray(f[name][...], dtype) for name, dtype in metrics.FIELDS.items()
                  if name in f}
        for name in metrics.VALIDATION_FIELDS:   # a file from before validation existed
            series.setdefault(name, np.full(series["step"].size, np.nan))
        # A live run's flush extends one dataset after another: keep the rows all have.
        rows = min(values.size for values in series.values())
        series = {name: values[:rows] for name, values in series.items()}
        events = []
        if "events" in f:
            group = f["events"]
            columns = {name: group[name][...] for name in metrics.EVENT_FIELDS if name in group}
            count = min((c.size for c in columns.values()), default=0)
            for i in range(count):
                events.append({name: _plain(values[i]) for name, values in columns.items()})
        timings = {}
        if "ranks" in f and all(name in f["ranks"] for name in ("step", "steps", *timing.COLUMNS)):
            group = f["ranks"]
            timings = {name: group[name][...] for name in ("step", "steps", *timing.COLUMNS)}
            windows = min(len(values) for values in timings.values())
            timings = {name: values[:windows] for name, values in timings.items()}
        attrs = {}
        for key, value in f.attrs.items():
            value = _plain(value)
            if key == "job" and isinstance(value, str):
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            attrs[key] = value
    if series["step"].size == 0:
        raise UserError(f"{metrics_path}: no steps recorded yet (rank 0 writes them every "
                        f"[output].metrics_flush_steps steps and at the end)")
    job_path = run_dir / "job.toml"
    job_text = job_path.read_text() if job_path.is_file() else None
    return RunRecord(run_dir, series, events, job_text, rundir.RunDir(run_dir).completion(), attrs,
                     timings)


def _plain(value):
    """numpy scalars and bytes from HDF5 as plain Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value
