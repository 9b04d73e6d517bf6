"""``granger-mpi report``: one self-contained HTML page about a run.

The page carries everything inline (charts as base64 ``data:`` URIs, CSS in a ``<style>``
element, no scripts, no external links), so it can be mailed, attached to a ticket or
opened on a machine without the run directory.
"""

import base64
import html
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from granger_mpi import __version__
from granger_mpi.observe import status
from granger_mpi.tools import plots
from granger_mpi.errors import WriteError

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; font-size: 0.9em; }
th { background: #f0f0f0; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; border: 1px solid #ddd; }
.note { color: #555; font-size: 0.9em; }
"""


def _table(rows, header=None):
    """An HTML table from rows of values (escaped)."""
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _number(value, digits=4):
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else f"{value:,}"


def _when(seconds):
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(seconds))


def summary_rows(record):
    """(name, value) rows: what a reader of the run wants first."""
    s = record.series
    window = plots.smoothing_window(record.steps)
    tail = slice(max(0, record.steps - window), record.steps)
    samples = s["samples_per_s"] * s["step_time_s"]
    seconds = float(np.nansum(s["step_time_s"]))
    classification = bool(np.isfinite(s["accuracy"]).any())
    rows = [
        ("steps recorded", f"{record.steps:,} (step {int(s['step'][0])} to {int(s['step'][-1])})"),
        ("epochs", f"{int(s['epoch'][-1]) + 1}"),
        ("world size at start", _number(record.attrs.get("world_size"))),
        ("final loss (last batch)", _number(float(s["loss"][-1]))),
        (f"final loss (mean of last {tail.stop - tail.start} steps)", _number(float(np.nanmean(s["loss"][tail])))),
    ]
    if classification:
        rows += [("final accuracy (last batch)", f"{100 * float(s['accuracy'][-1]):.2f}%"),
                 (f"final accuracy (mean of last {tail.stop - tail.start} steps)",
                  f"{100 * float(np.nanmean(s['accuracy'][tail])):.2f}%")]
    validated = np.flatnonzero(np.isfinite(s["val_loss"]))
    if validated.size:
        last = validated[-1]
        value = f"{_number(float(s['val_loss'][last]))} at step {int(s['step'][last]) + 1}"
        if classification:
            value += f", accuracy {100 * float(s['val_accuracy'][last]):.2f}%"
        rows.append((f"last validation (of {validated.size})", value))
    rows += [
        ("training time (sum of step times)", f"{seconds:.2f} s"),
        ("throughput (all samples / sum of step times)", f"{np.nansum(samples) / max(seconds, 1e-12):,.0f} samples/s"),
        ("median step time", f"{1000 * float(np.nanmedian(s['step_time_s'])):.3f} ms"),
        ("final learning rate", _number(float(s["learning_rate"][-1]))),
        ("recovery events", f"{len(record.events)}"),
    ]
    if record.completion:
        rows.append(("completed", "yes, at " + _when(record.completion["finished_at"])
                     if "finished_at" in record.completion else "yes"))
    else:
        rows.append(("completed", "no COMPLETE record: the run is still going, stopped or failed"))
    return rows


def build_html(record, charts_dir, charts, now=None):
    """The page as a string; ``charts`` (``plots.Chart``) are read from ``charts_dir``."""
    now = now or time.time()
    title = f"granger-mpi run {record.run_dir}"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="note">Report written {html.escape(_when(now))} by granger-mpi '
        f"{html.escape(__version__)} from {html.escape(str(record.run_dir))}/metrics.h5, "
        "job.toml, COMPLETE and status/.</p>",
        "<h2>Summary</h2>",
        _table(summary_rows(record)),
    ]
    if record.completion:
        parts += ["<h3>Completion record (COMPLETE)</h3>",
                  f"<pre>{html.escape(json.dumps(record.completion, indent=1))}</pre>"]
    parts.append("<h2>Rank failures and recoveries</h2>")
    if record.events:
        header = ["detected at", "step", "kind", "ranks lost", "world size after",
                  "detect s", "recovery s", "first step after s"]
        rows = [[_when(e["time"]) if "time" in e else "-", e.get("step", "-"), e.get("kind", "-"),
                 e.get("ranks_lost", "-"), e.get("world_size", "-"),
                 *(f"{e[k]:.3f}" if k in e else "-" for k in ("detect_s", "recovery_s", "first_step_s"))]
                for e in record.events]
        parts.append(_table(rows, header))
    else:
        parts.append("<p>None recorded.</p>")
    parts.append("<h2>Ranks (last published status)</h2>")
    text, _ = status.table(record.run_dir, now=now)
    parts.append(f"<pre>{html.escape(text)}</pre>" if text else
                 "<p>No status files in status/ (a run from before they existed, or deleted).</p>")
    parts.append("<h2>Charts</h2>")
    for chart in charts:
        data = base64.b64encode((Path(charts_dir) / chart.file_name).read_bytes()).decode("ascii")
        parts += [f"<h3>{html.escape(chart.title)}</h3>",
                  f'<p class="note">{html.escape(chart.description)}</p>',
                  f'<img alt="{html.escape(chart.title)}" src="data:image/png;base64,{data}">']
    if not any(chart.file_name == "time_per_rank.png" for chart in charts):
        parts.append(f'<p class="note">Not shown: {html.escape(plots.NOT_RECORDED)}.</p>')
    parts += ["<h2>Configuration (job.toml as run)</h2>",
              f"<pre>{html.escape(record.job_text)}</pre>" if record.job_text is not None else
              "<p>No job.toml in the run directory.</p>",
              "</body></html>"]
    return "\n".join(parts) + "\n"


def write_report(record, out_path):
    """Draw the charts (in a temporary folder) and write the page to ``out_path``."""
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory(prefix="granger-report-") as tmp:
        charts = plots.write_plots(record, tmp)
        page = build_html(record, tmp, charts)
    tmp_path = out_path.with_name(out_path.name + ".tmp")
    try:
        tmp_path.write_text(page, encoding="utf-8")
        tmp_path.replace(out_path)
    except OSError as exc:
        raise WriteError(f"cannot write {out_path}: {exc.strerror or exc}") from None
    return out_path
