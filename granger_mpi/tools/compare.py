"""``granger-mpi compare RUN_DIR...``: runs side by side (a sweep, a job array, before and after).

A table of what differs between their job files and what each run reached: final training
loss and accuracy (the mean of the last steps, as ``report`` gives them), the last
validation, the test score of ``summary.json``, throughput, failures, and whether it
completed; and ``loss.png`` and ``accuracy.png`` with every run's curve overlaid.
"""

import json
from pathlib import Path

import numpy as np

from granger_mpi import rundir
from granger_mpi.tools import plots, runfiles

COLUMNS = ("steps", "loss", "accuracy", "val loss", "val acc", "test loss", "test acc",
           "samples/s", "failures", "completed")


def _flat(job):
    """``{"[section].key": value}`` of a job's JSON (``metrics.h5``'s ``job`` attribute)."""
    return {f"[{section}].{key}": value for section, values in (job or {}).items()
            if isinstance(values, dict) for key, value in values.items()}


def differences(jobs):
    """The job keys whose values differ between ``jobs`` (run_dir excepted: it always does)."""
    flats = [_flat(job) for job in jobs]
    keys = sorted(set().union(*flats))
    return [key for key in keys if key != "[output].run_dir"
            and len({json.dumps(flat.get(key), sort_keys=True) for flat in flats}) > 1]


def summarize(record):
    """One run's figures, by ``COLUMNS`` name (None where the run has none)."""
    s = record.series
    tail = slice(max(0, record.steps - plots.smoothing_window(record.steps)), record.steps)
    samples = s["samples_per_s"] * s["step_time_s"]
    validated = np.flatnonzero(np.isfinite(s["val_loss"]))
    summary_path = rundir.RunDir(record.run_dir).summary
    summary = {}
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except ValueError:
            summary = {}

    def finite(value):
        return None if value is None or not np.isfinite(value) else float(value)
    return {
        "steps": record.steps,
        "loss": finite(np.nanmean(s["loss"][tail])) if record.steps else None,
        "accuracy": finite(np.nanmean(s["accuracy"][tail])) if record.steps and
        np.isfinite(s["accuracy"][tail]).any() else None,
        "val loss": finite(s["val_loss"][validated[-1]]) if validated.size else None,
        "val acc": finite(s["val_accuracy"][validated[-1]]) if validated.size else None,
        "test loss": summary.get("test_loss"), "test acc": summary.get("test_accuracy"),
        "samples/s": float(np.nansum(samples) / max(float(np.nansum(s["step_time_s"])), 1e-12)),
        "failures": sum(int(e.get("ranks_lost") or 0) for e in record.events),
        "completed": record.completion is not None,
    }


def _cell(name, value):
    if value is None:
        return "-"
    if name in ("accuracy", "val acc", "test acc"):
        return f"{100 * value:.2f}%"
    if name in ("loss", "val loss", "test loss"):
        return f"{value:.4f}"
    if name == "samples/s":
        return f"{value:,.0f}"
    if name == "completed":
        return "yes" if value else "no"
    return f"{value:,}" if isinstance(value, int) else str(value)


def table(records):
    """The text ``compare`` prints: one row per run, the differing job keys first."""
    differing = differences([r.attrs.get("job") for r in records])
    flats = [_flat(r.attrs.get("job")) for r in records]
    header = ["run", *differing, *COLUMNS]
    rows = [header]
    for record, flat in zip(records, flats):
        figures = summarize(record)
        rows.append([str(record.run_dir), *(json.dumps(flat.get(key)) for key in differing),
                     *(_cell(name, figures[name]) for name in COLUMNS)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    if not differing:
        lines.append("(the job files agree on every key but run_dir)")
    return "\n".join(lines)


def labels(records):
    """Short names for the legend: each run directory's name, with its parent if two agree."""
    names = [r.run_dir.name for r in records]
    if len(set(names)) < len(names):
        names = ["/".join(Path(r.run_dir).resolve().parts[-2:]) for r in records]
    return names


def charts(records, out_dir):
    """``loss.png`` and ``accuracy.png`` (if any run has accuracy) in ``out_dir``: every run's
    curve, smoothed as ``plot`` smooths it; validation points where a run validated."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, val, label, scale in (("loss", "val_loss", "loss (batch)", 1),
                                    ("accuracy", "val_accuracy", "accuracy % (batch)", 100)):
        if not any(np.isfinite(r.series[name]).any() for r in records):
            continue
        fig, (ax,) = plots.figure(1, height=5)
        for i, (record, run) in enumerate(zip(records, labels(records))):
            s, color = record.series, f"C{i % 10}"
            window = plots.smoothing_window(record.steps)
            ax.plot(*plots.thin(s["step"], scale * plots.smooth(s[name], window)), color=color,
                    lw=1.5, label=f"{run} (mean of {window} steps)")
            done = np.isfinite(s[val])
            if done.any():
                ax.plot(s["step"][done], scale * s[val][done], "o--", color=color, ms=4,
                        label=f"{run}: validation")
        if name == "loss":
            ax.set_yscale("log")
        ax.set(xlabel="step", ylabel=label, title=f"{name} by step, {len(records)} runs")
        ax.legend(fontsize=8)
        path = out_dir / f"{name}.png"
        plots.save(fig, path)
        written.append(path)
    return written


def main(run_dirs, out_dir, as_json=False, out=print):
    records = [runfiles.read_run(path) for path in run_dirs]
    if as_json:
        differing = differences([r.attrs.get("job") for r in records])
        out(json.dumps([{"run_dir": str(r.run_dir),
                         "job": {key: _flat(r.attrs.get("job")).get(key) for key in differing},
                         **summarize(r)} for r in records], indent=1))
        return 0
    out(table(records))
    for path in charts(records, out_dir):
        out(f"wrote {path}")
    return 0
