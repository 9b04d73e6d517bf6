"""``granger-mpi plot``: PNG charts of a run from its ``metrics.h5`` (matplotlib, Agg).

Every chart is drawn on its own ``Figure`` with an Agg canvas (no pyplot, no global
backend state), so plotting works without a display and inside other programs.
Recovery events (``metrics.h5`` group ``events``) are drawn as vertical lines on every
chart with a step or time axis.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from granger_mpi.errors import WriteError

# Charts of very long runs are thinned to about this many points (bin means): a PNG
# cannot show more, and matplotlib slows down on millions of points.
MAX_POINTS = 4000
EVENT_COLOR = "#d62728"
RAW_COLOR = "#9ecae1"
SMOOTH_COLOR = "#08519c"

NOT_RECORDED = ("per-rank time breakdown: this run recorded no timing windows (metrics.h5 "
                "group 'ranks'; async runs and runs of older versions have none)")
BREAKDOWN_COLORS = {"data": "#9467bd", "compute": "#2ca02c", "transfer": "#1f77b4",
                    "wait": "#ff7f0e", "checkpoint": "#8c564b", "other": "#7f7f7f"}
TIME_AXIS_NOTE = ("training time = cumulative step_time_s of rank 0; time spent in "
                  "checkpoints, recoveries and the final evaluation is not included")


@dataclass
class Chart:
    """One PNG written: file name, title, and what it shows."""

    file_name: str
    title: str
    description: str


def smooth(values, window):
    """Centred moving mean ignoring NaN (edges use the points available)."""
    values = np.asarray(values, np.float64)
    if window <= 1 or values.size < 3:
        return values
    ok = np.isfinite(values)
    kernel = np.ones(window)
    sums = np.convolve(np.where(ok, values, 0.0), kernel, mode="same")
    counts = np.convolve(ok.astype(np.float64), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def thin(x, y, max_points=MAX_POINTS):
    """``(x, y)`` reduced to at most ``max_points`` bin means (unchanged if already small)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.size <= max_points:
        return x, y
    bins = np.array_split(np.arange(x.size), max_points)
    return (np.array([x[b].mean() for b in bins]),
            np.array([np.nanmean(y[b]) if np.isfinite(y[b]).any() else np.nan for b in bins]))


def smoothing_window(n_steps):
    """About 1/50 of the run, at least 1: long enough to read a trend in noisy batch metrics."""
    return max(1, n_steps // 50)


def figure(rows=1, height=3.2, sharex=True):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, height * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=sharex, squeeze=False)[:, 0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def _mark_events(axes, positions, events):
    """A dashed vertical line per event; the legend names the first one of each kind."""
    for ax in axes:
        labelled = set()
        for x, event in zip(positions, events):
            label = (f"{event.get('kind', 'event')}: {event.get('ranks_lost', '?')} rank(s) lost"
                     if event.get("kind") not in labelled else None)
            labelled.add(event.get("kind"))
            ax.axvline(x, color=EVENT_COLOR, linestyle="--", linewidth=1.2, label=label)


def _series_panel(ax, x, y, window, label, ylabel, smoothed=None, smoothed_label=None):
    xs, ys = thin(x, y)
    ax.plot(xs, ys, color=RAW_COLOR, linewidth=0.8, label=f"{label} (per step)")
    xs, ys = thin(x, smooth(y, window) if smoothed is None else smoothed)
    ax.plot(xs, ys, color=SMOOTH_COLOR, linewidth=1.6,
            label=(smoothed_label or f"moving mean of {window} steps") if window > 1 else None)
    ax.set_ylabel(ylabel)


def save(fig, path):
    try:
        fig.savefig(path)
    except OSError as exc:
        raise WriteError(f"cannot write {path}: {exc.strerror or exc}") from None


def _loss_accuracy(record, x, xlabel, event_x, title, path):
    s = record.series
    has_accuracy = bool(np.isfinite(s["accuracy"]).any())
    fig, axes = figure(2 if has_accuracy else 1)
    window = smoothing_window(record.steps)
    _series_panel(axes[0], x, s["loss"], window, "training loss", "loss (batch)")
    if np.nanmin(s["loss"]) > 0 and np.nanmax(s["loss"]) / np.nanmin(s["loss"]) > 30:
        axes[0].set_yscale("log")   # losses falling over decades read better on a log axis
    if has_accuracy:
        _series_panel(axes[1], x, 100 * s["accuracy"], window, "training accuracy",
                      "accuracy % (batch)")
    validated = np.isfinite(s["val_loss"])
    if validated.any():     # [train].validate_every_steps: the whole validation set, as points
        axes[0].plot(x[validated], s["val_loss"][validated], "o-", color="tab:orange",
                     markersize=4, label="validation loss")
        if has_accuracy:
            axes[1].plot(x[validated], 100 * s["val_accuracy"][validated], "o-",
                         color="tab:orange", markersize=4, label="validation accuracy")
    _mark_events(axes, event_x, record.events)
    axes[-1].set_xlabel(xlabel)
    axes[0].set_title(title)
    for ax in axes:
        ax.legend(loc="best", fontsize=8)
    save(fig, path)


def _throughput(record, path):
    s = record.series
    fig, axes = figure(2)
    window = smoothing_window(record.steps)
    # A rate is averaged as samples over seconds: a mean of per-step rates would be
    # dominated by the few very fast steps.
    samples = s["samples_per_s"] * s["step_time_s"]
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = smooth(samples, window) / smooth(s["step_time_s"], window)
    _series_panel(axes[0], s["step"], s["samples_per_s"], window, "samples/s", "samples/s (global)",
                  smoothed=rate, smoothed_label=f"samples / seconds over {window} steps")
    _series_panel(axes[1], s["step"], 1000 * s["step_time_s"], window, "step time", "step time, ms")
    axes[1].set_yscale("log")    # the first steps (JIT compilation) are 100-1000x slower
    _mark_events(axes, [e["step"] for e in record.events], record.events)
    overall = float(np.nansum(samples) / max(np.nansum(s["step_time_s"]), 1e-12))
    axes[0].set_title(f"throughput: {overall:,.0f} samples/s over {record.steps:,} steps "
                      f"(all samples / sum of step times)")
    axes[1].set_xlabel("step")
    for ax in axes:
        ax.legend(loc="best", fontsize=8)
    save(fig, path)


def _events(record, path):
    fig, axes = figure(1)
    ax = axes[0]
    names = ("detect_s", "recovery_s", "first_step_s")
    width = 0.25
    index = np.arange(len(record.events))
    for k, name in enumerate(names):
        ax.bar(index + (k - 1) * width, [e.get(name, np.nan) for e in record.events], width,
               label=name)
    ax.set_xticks(index, [f"step {e['step']}\n{e['ranks_lost']} lost, P={e['world_size']} after"
                          for e in record.events], fontsize=8)
    ax.set_ylabel("seconds")
    ax.set_title("rank-failure recoveries: detection, recovery, first step after")
    ax.legend(fontsize=8)
    save(fig, path)


def _breakdown(record, path):
    t = record.timings
    steps = np.maximum(t["steps"].astype(np.float64), 1)[:, None]
    total_steps = float(np.sum(t["steps"]))
    # Per rank, ms per step over the whole run; communication split into moving bytes and
    # waiting for the slowest rank (wait = comm - least comm of any rank in the window).
    parts = {"data": t["data_s"], "compute": t["compute_s"], "transfer": t["comm_s"] - t["wait_s"],
             "wait": t["wait_s"], "checkpoint": t["checkpoint_s"], "other": t["other_s"]}
    per_rank = {name: 1000 * np.nansum(values, axis=0) / max(total_steps, 1)
                for name, values in parts.items()}
    ranks = np.arange(t["comm_s"].shape[1])
    fig, axes = figure(2, sharex=False)
    bottom = np.zeros(ranks.size)
    for name, values in per_rank.items():
        axes[0].bar(ranks, values, bottom=bottom, label=name, color=BREAKDOWN_COLORS[name])
        bottom += values
    axes[0].set_xticks(ranks, [f"rank {r}" for r in ranks], fontsize=8)
    axes[0].set_ylim(0, max(float(np.nanmax(bottom)), 1e-3) * 1.25)    # room for the legend
    axes[0].set_ylabel("ms per step")
    axes[0].set_title(f"where each rank's time went ({total_steps:,.0f} steps, "
                      f"{len(t['step'])} windows)")
    axes[0].legend(fontsize=8, ncol=6, loc="upper right")
    for r in ranks:
        axes[1].plot(t["step"], 1000 * t["wait_s"][:, r] / steps[:, 0], marker=".", label=f"rank {r}")
    _mark_events(axes[1:], [e["step"] for e in record.events], record.events)
    axes[1].set_xlabel("step (end of window)")
    axes[1].set_ylabel("wait, ms per step")
    axes[1].set_title("waiting for the slowest rank, per window")
    axes[1].legend(fontsize=8, ncol=min(8, ranks.size))
    save(fig, path)


def write_plots(record, out_dir):
    """Write every chart of ``record`` (a ``runfiles.RunRecord``) into ``out_dir``.

    Returns the ``Chart`` list, also written as ``out_dir/index.txt`` together with what
    could not be plotted because the run does not record it.
    """
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"cannot create {out_dir}: {exc.strerror or exc}") from None
    s = record.series
    seconds = record.training_seconds
    event_steps = [e["step"] for e in record.events]
    event_seconds = [record.seconds_at_step(step) for step in event_steps]
    events_note = (f"; {len(record.events)} recovery event(s) as red dashed lines"
                   if record.events else "; no recovery events in this run")
    charts = [
        Chart("loss_accuracy_vs_step.png", "Loss and accuracy vs step",
              "training loss and accuracy of each step's global batch, with a moving mean"
              + events_note),
        Chart("loss_accuracy_vs_time.png", "Loss and accuracy vs training time",
              f"the same against time ({TIME_AXIS_NOTE})" + events_note),
        Chart("throughput.png", "Throughput and step time",
              "samples/s of each step (global batch / rank 0's step time) and step time "
              "(log scale)" + events_note),
    ]
    _loss_accuracy(record, s["step"], "step", event_steps, "loss and accuracy by step",
                   out_dir / charts[0].file_name)
    _loss_accuracy(record, seconds, "training time, s (sum of step times)", event_seconds,
                   "loss and accuracy by training time", out_dir / charts[1].file_name)
    _throughput(record, out_dir / charts[2].file_name)
    if record.events:
        charts.append(Chart("recoveries.png", "Recoveries",
                            "per rank-failure event: seconds to detect it, to recover "
                            "(shrink, roll back, re-split) and to finish the first step after"))
        _events(record, out_dir / charts[-1].file_name)
    if record.timings and len(record.timings["step"]):
        charts.append(Chart("time_per_rank.png", "Time per rank",
                            "each rank's milliseconds per step in data loading, compute, "
                            "communication (moving bytes, and waiting for the slowest rank), "
                            "checkpoints and the rest (metrics, progress, status); below, the "
                            "wait per window" + events_note))
        _breakdown(record, out_dir / charts[-1].file_name)
    lines = [f"charts of {record.run_dir} ({record.steps:,} steps)", ""]
    lines += [f"{c.file_name}: {c.description}" for c in charts]
    if not (record.timings and len(record.timings["step"])):
        lines += ["", f"not plotted: {NOT_RECORDED}"]
    lines += [f"note: {TIME_AXIS_NOTE}"]
    try:
        (out_dir / "index.txt").write_text("\n".join(lines) + "\n")
    except OSError as exc:
        raise WriteError(f"cannot write {out_dir / 'index.txt'}: {exc.strerror or exc}") from None
    return charts
