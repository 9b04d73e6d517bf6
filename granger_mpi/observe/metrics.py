"""Per-step metrics in ``run_dir/metrics.h5`` and the progress line on rank 0."""

import sys
import time

import h5py
import numpy as np

from granger_mpi.errors import WriteError, describe_io_error
from granger_mpi.observe.reporters import extra_files, live_sinks, Reporter, Reporters
from granger_mpi.observe.timing import COLUMNS as TIMING_COLUMNS

FIELDS = {  # name: dtype
    "step": np.int64, "epoch": np.int64, "loss": np.float64, "accuracy": np.float64,
    "grad_norm": np.float64, "learning_rate": np.float64, "step_time_s": np.float64,
    "samples_per_s": np.float64, "val_loss": np.float64, "val_accuracy": np.float64,
}
# NaN except at the steps validated ([train].validate_every_steps); a file written before
# they existed gets them filled with NaN when a run resumes into it.
VALIDATION_FIELDS = ("val_loss", "val_accuracy")
# Rare events (a rank failure and its recovery), written at once to the group ``events``.
EVENT_FIELDS = {
    "time": np.float64, "step": np.int64, "kind": h5py.string_dtype(), "ranks_lost": np.int64,
    "world_size": np.int64, "detect_s": np.float64, "recovery_s": np.float64,
    "first_step_s": np.float64, "revoke_s": np.float64, "shrink_s": np.float64,
    "agree_s": np.float64, "spares_used": np.int64, "transfer_s": np.float64,
}


class MetricsFile(Reporter):
    """Appends one row per step to ``metrics.h5`` (one 1-D dataset per field).

    Rows are buffered and written every ``flush_every`` steps and on close, so the file
    costs nothing per step. A step (or timing window) the file holds already is skipped,
    so a writer that takes over can hand it every record it kept. Only one process writes
    it (rank 0). Per-rank time windows go to the group ``ranks``: ``step`` and ``steps``
    (1-D), and one 2-D dataset per ``timing.COLUMNS`` entry, a row per window and a column
    per world rank.
    """

    def __init__(self, path, flush_every=100, attrs=None, resume_step=None, log=print):
        """A new file, or with ``resume_step`` the existing one cut back to earlier steps.
        An existing file that cannot be read (a node crashed during a flush) is kept aside
        under another name, said in ``log``, and a new one started."""
        self.path = path
        self.flush_every = flush_every
        self._rows = {name: [] for name in FIELDS}
        self.last_step = self.last_window = -1     # the last step and timing window held
        self._file = None
        if resume_step is not None and path.exists():
            try:
                self._cut_back(resume_step)
            except (OSError, RuntimeError, KeyError, ValueError) as exc:
                if self._file is not None:
                    self._file.close()
                self.last_step = self.last_window = -1
                aside = path.with_name(f"metrics.damaged-{int(time.time())}.h5")
                path.replace(aside)
                log(f"metrics file {path} unreadable ({exc}); kept as {aside}, starting a new "
                    f"one at step {resume_step}")
                self._create()
        else:
            self._create()
        for key, value in (attrs or {}).items():
            self._file.attrs[key] = value

    def _create(self):
        try:
            self._file = h5py.File(self.path, "w")
            for name, dtype in FIELDS.items():
                self._file.create_dataset(name, (0,), dtype, maxshape=(None,), chunks=(4096,))
        except (OSError, RuntimeError) as exc:
            raise WriteError(f"cannot write metrics to {self.path}: {describe_io_error(exc)}") from None

    def _cut_back(self, resume_step):
        """Open the existing file and drop the steps from ``resume_step`` on."""
        self._file = h5py.File(self.path, "a")
        steps = self._file["step"][...]
        for name in VALIDATION_FIELDS:
            if name not in self._file:
                self._file.create_dataset(name, data=np.full(steps.size, np.nan), maxshape=(None,),
                                          chunks=(4096,))
        keep = int(np.searchsorted(steps, resume_step))
        for name in FIELDS:   # steps after the checkpoint will be run (and logged) again
            self._file[name].resize(keep, axis=0)
        self.last_step = int(steps[keep - 1]) if keep else -1
        if "ranks" in self._file:
            group = self._file["ranks"]
            windows = group["step"][...]
            keep = int(np.searchsorted(windows, resume_step))
            for dset in group.values():
                dset.resize(keep, axis=0)
            self.last_window = int(windows[keep - 1]) if keep else -1

    def event(self, row):
        """Record one event now (every field of ``EVENT_FIELDS``); kept across resumes."""
        try:
            group = self._file.require_group("events")
            held = group["time"].shape[0] if "time" in group else 0
            for name, dtype in EVENT_FIELDS.items():
                if name not in group:   # a field newer than the file: NaN for its old events
                    group.create_dataset(name, (held,), dtype, maxshape=(None,), chunks=(64,),
                                         fillvalue=np.nan if dtype == np.float64 else None)
                dset = group[name]
                dset.resize(dset.shape[0] + 1, axis=0)
                dset[-1] = row[name]
            self._file.flush()
        except (OSError, RuntimeError) as exc:
            raise WriteError(f"cannot write metrics to {self.path}: {describe_io_error(exc)}") from None

    def step(self, row):
        """Add one step's values (every field of ``FIELDS``)."""
        if row["step"] <= self.last_step:
            return
        self.last_step = row["step"]
        for name in FIELDS:
            self._rows[name].append(row[name])
        if len(self._rows["step"]) >= self.flush_every:
            self.flush()

    def timings(self, row):
        """Add one window of per-rank seconds (written at once: one row per window)."""
        if row["step"] <= self.last_window:
            return
        self.last_window = row["step"]
        width = len(row[TIMING_COLUMNS[0]])
        try:
            group = self._file.require_group("ranks")
            if "step" not in group:
                for name in ("step", "steps"):
                    group.create_dataset(name, (0,), np.int64, maxshape=(None,), chunks=(256,))
                for name in TIMING_COLUMNS:
                    group.create_dataset(name, (0, width), np.float64, maxshape=(None, None),
                                         chunks=(64, max(1, width)), fillvalue=np.nan)
            n = group["step"].shape[0]
            for name in ("step", "steps"):
                group[name].resize(n + 1, axis=0)
                group[name][n] = row[name]
            for name in TIMING_COLUMNS:   # a resume at a larger world size widens the table
                dset = group[name]
                dset.resize((n + 1, max(dset.shape[1], width)))
                dset[n, :width] = row[name]
        except (OSError, RuntimeError) as exc:
            raise WriteError(f"cannot write metrics to {self.path}: {describe_io_error(exc)}") from None

    def flush(self):
        """Write buffered rows to the file (``WriteError`` naming it if that fails)."""
        count = len(self._rows["step"])
        if not count:
            return
        try:
            for name, values in self._rows.items():
                dset = self._file[name]
                start = dset.shape[0]
                dset.resize(start + count, axis=0)
                dset[start:] = np.asarray(values, FIELDS[name])
                values.clear()
            self._file.flush()
        except (OSError, RuntimeError) as exc:
            raise WriteError(f"cannot write metrics to {self.path}: {describe_io_error(exc)}") from None

    def close(self):
        """Flush and close (the file is closed even when the flush fails)."""
        if self._file.id.valid:
            try:
                self.flush()
            finally:
                try:
                    self._file.close()
                except (OSError, RuntimeError):
                    pass   # the flush above has already raised the error worth reporting


def open_sinks(run_dir, job, attrs=None, resume_step=None, *, live=True, log=print):
    """Rank 0's sinks as one ``Reporters``: ``metrics.h5`` (cut back to ``resume_step`` if
    given; set aside, said in ``log``, if unreadable), the other files the job asks for
    and, with ``live``, its live reporters."""
    sinks = [MetricsFile(run_dir / "metrics.h5", job.output.metrics_flush_steps, attrs,
                         resume_step=resume_step, log=log)]
    try:
        sinks += extra_files(run_dir, job, resume_step)
        if live:
            sinks += live_sinks(run_dir, job)
    except BaseException:
        sinks[0].close()
        raise
    return Reporters(sinks)


def format_duration(seconds):
    """``1:02:03`` style."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
    """One plain line every ``interval_s`` seconds (no carriage returns: logs stay readable)."""

    def __init__(self, total_steps, interval_s, log=None):
        self.total_steps = total_steps
        self.interval_s = interval_s
        self.log = log or (lambda line: print(line, file=sys.stdout, flush=True))
        self.start = time.perf_counter()
        self.last = -float("inf")
        self.samples = 0

    def update(self, step_index, epoch, epochs, loss, accuracy, samples, force=False, detail="",
               validation=None):
        """Count ``samples`` and print if the interval has passed (or ``force``, or with a
        ``validation`` (loss, accuracy or None) to show); ``detail`` (the allreduce in use and
        the fault mode, say) ends the line."""
        self.samples += samples
        now = time.perf_counter()
        if not force and validation is None and now - self.last < self.interval_s:
            return
        self.last = now
        elapsed = now - self.start
        done = step_index + 1
        eta = elapsed / done * (self.total_steps - done)
        acc = "" if accuracy is None else f" acc {100 * accuracy:5.1f}%"
        if validation is not None:
            val_loss, val_accuracy = validation
            acc += f" val loss {val_loss:.4f}" + ("" if val_accuracy is None else
                                                  f" acc {100 * val_accuracy:5.1f}%")
        self.log(f"step {done}/{self.total_steps} epoch {epoch + 1}/{epochs} loss {loss:.4f}{acc} "
                 f"{self.samples / max(elapsed, 1e-9):,.0f} samples/s "
                 f"elapsed {format_duration(elapsed)} eta {format_duration(eta)}"
                 + (f" {detail}" if detail else ""))
