"""``granger-mpi dashboard RUN_DIR``: a live page of a run, served while it trains and after.

Read-only and without MPI: each request reads the run directory as ``status`` and ``plot``
do (``metrics.h5`` without HDF5's file lock, so the writer is never in the way; the status
files), standard-library HTTP only. ``/`` is one page that loads nothing from elsewhere and
asks ``/api/state`` for the run every ``REFRESH_S`` seconds: loss and accuracy (training,
and validation when the job validates), throughput, each rank's state and step, and the
recoveries as they happen.
"""

import json
import math
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import h5py
import numpy as np

from granger_mpi import rundir
from granger_mpi.errors import UserError
from granger_mpi.observe import metrics, status

REFRESH_S = 2.0
POINTS = 800        # at most this many points per chart: long runs are read with a stride


def _plain(value):
    """JSON-able, NaN and infinities as null."""
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def _series(path):
    """Steps, losses, accuracies and throughput of ``metrics.h5`` (every ``stride``-th step,
    and the last), the validated steps in full, the events; None before the file exists."""
    if not path.is_file():
        return None
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError:     # being created this instant
        return None
    with f:
        # A live flush extends one dataset after another: the rows all of them have.
        names = [name for name in ("step", "loss", "accuracy", "samples_per_s") if name in f]
        if len(names) < 4:
            return None
        n = min(f[name].shape[0] for name in names)
        stride = max(1, math.ceil(n / POINTS))
        picks = np.unique(np.r_[np.arange(0, n, stride), n - 1]) if n else np.arange(0)
        out = {name: [_plain(v) for v in f[name][:n][picks]] for name in names}
        validation = {"step": [], "loss": [], "accuracy": []}
        if "val_loss" in f:
            val_loss = f["val_loss"][:n]
            done = np.flatnonzero(np.isfinite(val_loss))
            steps, accuracy = f["step"][:n][done], f["val_accuracy"][:n][done]
            validation = {"step": [int(s) for s in steps], "loss": [_plain(v) for v in val_loss[done]],
                          "accuracy": [_plain(v) for v in accuracy]}
        events = []
        if "events" in f and "step" in f["events"]:
            group = f["events"]
            count = min(group[name].shape[0] for name in group if name in metrics.EVENT_FIELDS)
            events = [{name: _plain(group[name][i]) for name in metrics.EVENT_FIELDS if name in group}
                      for i in range(count)]
    return {"steps": int(n), "series": out, "validation": validation, "events": events}


def state(run_dir, now=None):
    """Everything the page shows, as JSON-able data (also ``/api/state``)."""
    now = now or time.time()
    run = rundir.RunDir(run_dir)
    overview = status.overview(run_dir, now)
    data = _series(run.metrics)
    completion = None
    if run.complete.is_file():
        try:
            completion = json.loads(run.complete.read_text())
        except (OSError, ValueError):
            completion = None
    ranks = []
    for r in (overview or {}).get("ranks", []):
        ranks.append({"rank": r["rank"], "host": r.get("host", "?"), "pid": r.get("pid", 0),
                      "state": r["shown"], "step": r.get("step", 0),
                      "for_s": round(now - r.get("since", now), 1),
                      "heartbeat_s": round(now - r.get("updated", now), 1), "note": r.get("note", "")})
    phase = overview["phase"] if overview else ("complete" if completion else "not started")
    return {"run_dir": str(run_dir), "now": now, "phase": phase,
            "mode": overview["mode"] if overview else None,
            "alive": overview["alive"] if overview else 0, "failed": overview["failed"] if overview else 0,
            "step": overview["step"] if overview else 0, "ranks": ranks,
            "metrics": data, "completion": completion, "refresh_s": REFRESH_S}


class _Handler(BaseHTTPRequestHandler):
    run_dir: Path = None    # set on the subclass ``serve`` makes

    def do_GET(self):       # noqa: N802 - the name http.server calls
        if self.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, "text/html; charset=utf-8", PAGE.encode())
        elif self.path == "/api/state":
            body = json.dumps(state(self.run_dir), allow_nan=False).encode()
            self._send(HTTPStatus.OK, "application/json", body)
        else:
            self._send(HTTPStatus.NOT_FOUND, "text/plain", b"not found: / and /api/state only\n")

    def do_HEAD(self):      # noqa: N802
        self.do_GET()

    def _send(self, code, content_type, body):
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format, *args):   # noqa: A002 - http.server's signature
        pass    # a request every REFRESH_S seconds per viewer: not worth a line each


def serve(run_dir, host="127.0.0.1", port=8050, out=print):
    """Serve the dashboard of ``run_dir`` until interrupted (``port`` 0: any free one)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found")
    handler = type("Handler", (_Handler,), {"run_dir": run_dir})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as exc:
        raise UserError(f"cannot serve on {host}:{port}: {exc.strerror or exc}") from None
    server.daemon_threads = True
    out(f"dashboard of {run_dir}: http://{host}:{server.server_address[1]}/ "
        f"(read-only, refreshes every {REFRESH_S:g} s; Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>granger-mpi dashboard</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.2em; color: #222; max-width: 1200px; }
h1 { font-size: 1.3em; margin: 0 0 .3em; } .muted { color: #777; }
.badge { padding: .1em .5em; border-radius: .3em; color: #fff; font-weight: 600; }
.running { background: #2a7; } .complete { background: #36c; } .stopped { background: #a55; }
.cards { display: flex; gap: 1em; flex-wrap: wrap; margin: .8em 0; }
.card { border: 1px solid #ddd; border-radius: .4em; padding: .5em .8em; min-width: 9em; }
.card b { display: block; font-size: 1.3em; }
.charts { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }
canvas { width: 100%; height: 260px; border: 1px solid #eee; }
table { border-collapse: collapse; margin: .5em 0 1em; } td, th { padding: .2em .7em; text-align: right; }
th { border-bottom: 1px solid #ccc; } td.note { text-align: left; color: #555; }
tr.FAILED td, tr.LOST td { color: #b00; font-weight: 600; } tr.SPARE td { color: #888; }
</style></head><body>
<h1>granger-mpi <span id="run" class="muted"></span> <span id="phase" class="badge"></span></h1>
<div class="muted" id="updated"></div>
<div class="cards" id="cards"></div>
<div class="charts"><div><canvas id="loss"></canvas></div><div><canvas id="accuracy"></canvas></div>
<div><canvas id="throughput"></canvas></div><div id="eventsbox"><h3>Recoveries</h3><div id="events"></div></div></div>
<h3>Ranks</h3><table id="ranks"></table>
<script>
const esc = t => String(t).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
const fmt = (v, d) => v === null || v === undefined ? "-" : Number(v).toFixed(d);
function chart(id, title, lines, opts) {
  const c = document.getElementById(id), dpr = window.devicePixelRatio || 1;
  c.width = c.clientWidth * dpr; c.height = c.clientHeight * dpr;
  const g = c.getContext("2d"); g.scale(dpr, dpr);
  const W = c.clientWidth, H = c.clientHeight, L = 60, R = 10, T = 22, B = 28;
  g.clearRect(0, 0, W, H); g.font = "12px system-ui"; g.fillStyle = "#222"; g.fillText(title, L, 14);
  let xs = [], ys = [];
  for (const s of lines) for (let i = 0; i < s.x.length; i++) if (s.y[i] !== null && (!opts.log || s.y[i] > 0)) { xs.push(s.x[i]); ys.push(s.y[i]); }
  if (!xs.length) { g.fillStyle = "#999"; g.fillText("no data yet", L + 10, T + 30); return; }
  const tr = v => opts.log ? Math.log10(v) : v;
  let x0 = Math.min(...xs), x1 = Math.max(...xs), y0 = Math.min(...ys.map(tr)), y1 = Math.max(...ys.map(tr));
  if (x1 === x0) x1 = x0 + 1; if (y1 === y0) { y1 += 0.5; y0 -= 0.5; }
  const px = x => L + (x - x0) / (x1 - x0) * (W - L - R), py = y => T + (1 - (tr(y) - y0) / (y1 - y0)) * (H - T - B);
  g.strokeStyle = "#ccc"; g.strokeRect(L, T, W - L - R, H - T - B); g.fillStyle = "#555";
  for (let k = 0; k <= 4; k++) {
    const v = y0 + (y1 - y0) * k / 4, y = T + (1 - k / 4) * (H - T - B);
    g.fillText(opts.log ? Number(Math.pow(10, v)).toPrecision(2) : Number(v).toPrecision(3), 4, y + 4);
  }
  g.fillText(String(x0), L, H - 8); g.fillText(String(x1), W - R - 40, H - 8); g.fillText("step", W / 2, H - 8);
  for (const e of (opts.events || [])) {
    g.strokeStyle = "#d33"; g.setLineDash([4, 3]); g.beginPath(); g.moveTo(px(e), T); g.lineTo(px(e), H - B); g.stroke(); g.setLineDash([]);
  }
  let lx = L + g.measureText(title).width + 16;
  for (const s of lines.filter(s => s.y.some(y => y !== null))) {
    g.strokeStyle = s.color; g.fillStyle = s.color; g.lineWidth = s.dots ? 2 : 1; g.beginPath(); let on = false;
    for (let i = 0; i < s.x.length; i++) {
      const y = s.y[i]; if (y === null || (opts.log && y <= 0)) { on = false; continue; }
      if (on) g.lineTo(px(s.x[i]), py(y)); else g.moveTo(px(s.x[i]), py(y)); on = true;
      if (s.dots) g.fillRect(px(s.x[i]) - 2, py(y) - 2, 4, 4);
    }
    g.stroke(); g.fillText("\u25a0 " + s.label, lx, 14); lx += g.measureText(s.label).width + 28;
  }
}
function card(name, value) { return `<div class="card">${name}<b>${value}</b></div>`; }
async function refresh() {
  let s;
  try { s = await (await fetch("/api/state", {cache: "no-store"})).json(); }
  catch (e) { document.getElementById("updated").textContent = "dashboard server not reachable: " + e; return; }
  document.getElementById("run").textContent = s.run_dir;
  const ph = document.getElementById("phase"); ph.textContent = s.phase;
  ph.className = "badge " + (s.phase === "running" ? "running" : s.phase === "complete" ? "complete" : "stopped");
  document.getElementById("updated").textContent = "updated " + new Date(s.now * 1000).toLocaleTimeString() +
    (s.mode ? ", fault mode " + s.mode : "");
  const m = s.metrics, ser = m ? m.series : {step: [], loss: [], accuracy: [], samples_per_s: []};
  const last = k => ser[k].length ? ser[k][ser[k].length - 1] : null, v = m ? m.validation : {step: [], loss: [], accuracy: []};
  const rate = ser.samples_per_s.slice(-50).filter(x => x !== null).sort((a, b) => a - b);
  const cards = [card("step", s.step), card("ranks alive", `${s.alive} of ${s.ranks.length}`),
    card("ranks failed", s.failed), card("loss (last step)", fmt(last("loss"), 4)),
    card("accuracy (last step)", last("accuracy") === null ? "-" : fmt(100 * last("accuracy"), 1) + "%"),
    card("samples/s (median, last 50)", rate.length ? Math.round(rate[rate.length >> 1]).toLocaleString() : "-")];
  if (v.step.length) cards.push(card("validation loss", fmt(v.loss[v.loss.length - 1], 4)));
  if (s.completion) cards.push(card("outcome", "complete"));
  document.getElementById("cards").innerHTML = cards.join("");
  const ev = m ? m.events.map(e => e.step) : [];
  chart("loss", "loss", [{x: ser.step, y: ser.loss, color: "#48c", label: "training"},
    {x: v.step, y: v.loss, color: "#e80", label: "validation", dots: true}], {log: true, events: ev});
  chart("accuracy", "accuracy", [{x: ser.step, y: ser.accuracy, color: "#48c", label: "training"},
    {x: v.step, y: v.accuracy, color: "#e80", label: "validation", dots: true}], {events: ev});
  chart("throughput", "samples/s", [{x: ser.step, y: ser.samples_per_s, color: "#4a4", label: "per step"}], {log: true, events: ev});
  document.getElementById("events").innerHTML = !m || !m.events.length ? "<p class='muted'>none</p>" :
    "<table><tr><th>step</th><th>ranks lost</th><th>world size</th><th>spares used</th><th>detect s</th><th>recovery s</th><th>first step s</th></tr>" +
    m.events.map(e => `<tr><td>${e.step}</td><td>${e.ranks_lost}</td><td>${e.world_size}</td><td>${e.spares_used ?? "-"}</td>` +
      `<td>${fmt(e.detect_s, 3)}</td><td>${fmt(e.recovery_s, 3)}</td><td>${fmt(e.first_step_s, 3)}</td></tr>`).join("") + "</table>";
  document.getElementById("ranks").innerHTML = "<tr><th>rank</th><th>host</th><th>pid</th><th>state</th><th>step</th><th>for s</th><th>heartbeat s</th><th>note</th></tr>" +
    s.ranks.map(r => `<tr class="${esc(r.state.replace("?", ""))}"><td>${r.rank}</td><td>${esc(r.host)}</td><td>${r.pid}</td><td>${esc(r.state)}</td>` +
      `<td>${r.step}</td><td>${r.for_s}</td><td>${r.heartbeat_s}</td><td class="note">${esc(r.note)}</td></tr>`).join("");
}
refresh(); setInterval(refresh, REFRESH_MS);
</script></body></html>
""".replace("REFRESH_MS", str(int(REFRESH_S * 1000)))
