"""Where rank 0 sends what a run reports: ``metrics.h5`` always, and any other sinks.

A sink is a ``Reporter``. Built in: ``metrics.MetricsFile`` (HDF5, always on),
``JsonLinesReporter`` (``[output].jsonl``: ``RUN_DIR/metrics.jsonl``, one JSON object a
line, for ``jq``, Vector, Fluent Bit) and ``HttpReporter`` (``[output].http_url``: batches
of JSON lines POSTed as ``application/x-ndjson``, e.g. to a collector in front of a
database). Your own: ``[output].reporters = ["package.module:factory"]``, where
``factory(run_dir=..., job=...)`` returns a ``Reporter``; it runs on rank 0 only.

Every record carries ``type``: ``step`` (``metrics.FIELDS``), ``timings`` (a window of
per-rank seconds, ``timing.COLUMNS``, one value per world rank) or ``event`` (a rank
failure and its recovery, ``metrics.EVENT_FIELDS``).
"""

import base64
import json
import math
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections import deque

from granger_mpi import factories, secrets
from granger_mpi.errors import UserError, WriteError, describe_io_error


class Reporter:
    """A sink for what a run reports on rank 0; override what you need (all do nothing).

    ``step`` is called once per training step, so it must be cheap: buffer, and do the
    slow part in ``flush`` (called every ``[output].metrics_flush_steps`` steps, before
    each checkpoint and at the end).
    """

    def step(self, row):
        """One training step: a dict of ``metrics.FIELDS``."""

    def timings(self, row):
        """One window of per-rank time: ``step`` (the last of the window), ``steps`` and
        one list per ``timing.COLUMNS`` entry, indexed by world rank (NaN: rank lost)."""

    def event(self, row):
        """A rank failure and its recovery: a dict of ``metrics.EVENT_FIELDS``."""

    def flush(self):
        """Write out what is buffered."""

    def close(self):
        """Flush and release what the sink holds."""
        self.flush()


def _plain(value):
    """JSON has no NaN: missing values (accuracy of a regression, a lost rank) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):    # numpy scalars
        return _plain(value.item())
    return value


def json_line(kind, row):
    """One record as a line of JSON (no trailing newline)."""
    return json.dumps({"type": kind, **{k: _plain(v) for k, v in row.items()}}, allow_nan=False)


class _LineReporter(Reporter):
    """Buffers records as JSON lines; subclasses say where ``flush`` sends them."""

    def __init__(self, flush_every):
        self.flush_every = flush_every
        self.lines = []

    def _add(self, kind, row):
        self.lines.append(json_line(kind, row))
        if len(self.lines) >= self.flush_every:
            self.flush()

    def step(self, row):
        self._add("step", row)

    def timings(self, row):
        self._add("timings", row)

    def event(self, row):
        self._add("event", row)
        self.flush()    # rare and worth seeing at once


class JsonLinesReporter(_LineReporter):
    """``RUN_DIR/metrics.jsonl``; on a resume, the lines of steps to be run again are cut.
    A step (or timing window) it holds already is skipped, so a writer that takes over can
    hand it every record it kept."""

    def __init__(self, path, flush_every=100, resume_step=None):
        super().__init__(flush_every)
        self.path = path
        self.last = {"step": -1, "timings": -1}    # the last step of each kind held
        try:
            if resume_step is not None and path.exists():
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and _before(line, resume_step)]
                for line in kept:
                    record = json.loads(line)
                    if record["type"] in self.last:
                        self.last[record["type"]] = max(self.last[record["type"]], record["step"])
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(line + "\n" for line in kept))
                tmp.replace(path)
            else:
                path.write_text("")
        except OSError as exc:
            raise WriteError(f"cannot write {path}: {describe_io_error(exc)}") from None

    def _add(self, kind, row):
        if kind in self.last:
            if row["step"] <= self.last[kind]:
                return
            self.last[kind] = row["step"]
        super()._add(kind, row)

    def flush(self):
        if not self.lines:
            return
        try:
            with open(self.path, "a") as f:
                f.write("".join(line + "\n" for line in self.lines))
        except OSError as exc:
            raise WriteError(f"cannot write {self.path}: {describe_io_error(exc)}") from None
        self.lines.clear()


def _before(line, step):
    """Whether a JSON line is about a step before ``step`` (events are always kept)."""
    try:
        record = json.loads(line)
    except ValueError:
        return False    # a line torn by a crash mid-write
    return record.get("type") == "event" or record.get("step", -1) < step


class HttpReporter(_LineReporter):
    """POSTs batches of JSON lines to ``url`` (``Content-Type: application/x-ndjson``) from
    a thread of its own: a slow or dead collector never holds up training.

    ``flush`` hands the lines to the thread and returns. Each POST has a deadline of
    ``timeout_s`` for all of it (connect, send, the status line), reads no more than the
    status line (4 KiB at most) and follows no redirect (a 3xx is a failure). A failed POST
    keeps its lines for the next try, a second later (the oldest beyond ``max_buffered``
    are dropped, and counted), and is reported on stderr once per outage, with the count
    of lines sent when it ends. ``close`` waits at most ``drain_s`` for the rest to be sent
    and says what it drops. Credentials in the URL are sent (HTTP basic authentication),
    never shown.
    """

    RETRY_S = 1.0

    def __init__(self, url, flush_every=100, timeout_s=5.0, max_buffered=100_000, drain_s=10.0,
                 log=None):
        super().__init__(flush_every)
        self.url, self.shown = url, secrets.redact_url(url)
        self.timeout_s, self.max_buffered, self.drain_s = timeout_s, max_buffered, drain_s
        self.log = log or (lambda message: print(message, file=sys.stderr, flush=True))
        self.failing = False
        self.dropped = 0
        self._pending = deque()          # lines not sent yet, oldest first
        self._wake = threading.Condition()
        self._closing = False
        self._in_flight = 0              # lines of the POST under way
        self._thread = threading.Thread(target=self._send_all, name="granger-http-reporter",
                                        daemon=True)
        self._thread.start()

    def flush(self):
        if not self.lines:
            return
        with self._wake:
            self._pending.extend(self.lines)
            self._trim()
            self._wake.notify()
        self.lines.clear()

    def _trim(self):
        excess = len(self._pending) - self.max_buffered
        for _ in range(excess):
            self._pending.popleft()
        self.dropped += max(0, excess)

    def _send_all(self):
        while True:
            with self._wake:
                while not self._pending and not self._closing:
                    self._wake.wait()
                if not self._pending:
                    return
                batch = list(self._pending)
                self._pending.clear()
                self._in_flight = len(batch)
            problem = self._post(batch)
            with self._wake:
                self._in_flight = 0
                if problem is None:
                    if self.failing:
                        self.log(f"reporter {self.shown}: reachable again; sent {len(batch)} record(s)"
                                 + (f", {self.dropped} dropped while it was not" if self.dropped else ""))
                    self.failing = False
                    continue
                if not self.failing:
                    self.log(f"reporter {self.shown}: {problem}; keeping the records and trying "
                             f"again")
                self.failing = True
                self._pending.extendleft(reversed(batch))
                self._trim()
                if self._closing:      # in an outage at the end: no more tries
                    return
                self._wake.wait(self.RETRY_S)

    def _post(self, lines):
        """POST ``lines``; None when the collector took them, else what went wrong."""
        parts = urllib.parse.urlsplit(self.url)
        body = "".join(line + "\n" for line in lines).encode()
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.hostname + (f":{parts.port}" if parts.port else "")
        auth = ""
        if parts.username is not None:
            token = base64.b64encode(f"{urllib.parse.unquote(parts.username)}:"
                                     f"{urllib.parse.unquote(parts.password or '')}".encode())
            auth = f"Authorization: Basic {token.decode()}\r\n"
        head = (f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-ndjson\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n{auth}\r\n").encode()
        deadline = time.monotonic() + self.timeout_s
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            with socket.create_connection((parts.hostname, port), timeout=self.timeout_s) as sock:
                if parts.scheme == "https":
                    sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.sendall(head + body)
                answer = b""
                while b"\r\n" not in answer and len(answer) < 4096:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"no answer within {self.timeout_s:g} s")
                    sock.settimeout(remaining)
                    got = sock.recv(4096 - len(answer))
                    if not got:
                        break
                    answer += got
        except (OSError, ValueError) as exc:    # ssl.SSLError and TimeoutError are OSErrors
            return str(exc) or type(exc).__name__
        status = answer.split(b"\r\n", 1)[0].split()
        code = int(status[1]) if len(status) >= 2 and status[1].isdigit() else 0
        if 200 <= code < 300:
            return None
        if 300 <= code < 400:
            return f"the collector answered {code} (a redirect, not followed)"
        return f"the collector answered {code}" if code else "the collector gave no HTTP answer"

    def close(self):
        self.flush()
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(self.drain_s)
        with self._wake:
            left = len(self._pending) + self._in_flight
            if left:
                self.log(f"reporter {self.shown}: {left} record(s) not delivered within "
                         f"{self.drain_s:g} s at the end of the run: dropped")
            self._pending.clear()


class Reporters(Reporter):
    """Sends every record to each of ``sinks`` in order."""

    def __init__(self, sinks):
        self.sinks = list(sinks)

    def step(self, row):
        for sink in self.sinks:
            sink.step(row)

    def timings(self, row):
        for sink in self.sinks:
            sink.timings(row)

    def event(self, row):
        for sink in self.sinks:
            sink.event(row)

    def flush(self):
        for sink in self.sinks:
            sink.flush()

    def close(self):
        """Close every sink, even when one fails; the first failure is raised."""
        failure = None
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as exc:    # noqa: BLE001 - the others must still be closed
                failure = failure or exc
        if failure is not None:
            raise failure


def load_custom(spec, run_dir, job):
    """A user's reporter from ``"package.module:factory"``."""
    factory = factories.load(spec, f"[output].reporters entry {spec!r}")
    try:
        reporter = factory(run_dir=run_dir, job=job)
    except Exception as exc:    # noqa: BLE001 - a user's code: any failure is bad input
        raise UserError(f"[output].reporters entry {spec!r} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(reporter, Reporter):
        raise UserError(f"[output].reporters entry {spec!r} returned {type(reporter).__name__}, "
                        f"not a granger_mpi.reporters.Reporter")
    return reporter


def extra_files(run_dir, job, resume_step=None):
    """The files the job asks for besides ``metrics.h5``."""
    out = job.output
    if not out.jsonl:
        return []
    return [JsonLinesReporter(run_dir / "metrics.jsonl", out.metrics_flush_steps, resume_step)]


def live_sinks(run_dir, job):
    """The live reporters the job asks for: HTTP, and a user's."""
    out = job.output
    sinks = []
    if out.http_url:
        url = secrets.resolve(out.http_url, "[output].http_url")
        if not url.startswith(("http://", "https://")):
            raise UserError(f"[output].http_url = {out.http_url!r} gives {secrets.redact_url(url)!r}, "
                            f"which does not start with http:// or https://")
        sinks.append(HttpReporter(url, out.metrics_flush_steps))
    sinks.extend(load_custom(spec, run_dir, job) for spec in out.reporters)
    return sinks
