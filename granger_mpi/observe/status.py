"""Per-rank status files, the hang watchdog, and the ``granger-mpi status`` table.

Every rank keeps its state (``IDLE``, ``STARTING``, ``TRAINING``, ``AGGREGATING``,
``CHECKPOINTING``, ``VALIDATING``, ``FAILED``, ``RECOVERING``, ``FINISHING``; ``SPARE`` for an idle spare rank), step and timestamps in memory; the training
loop only assigns attributes. A background thread writes them every ``interval_s`` to
``RUN_DIR/status/rank-NNNNN.json`` (atomically, by rename; from the moment the run
directory is accepted) and watches for a hang: a start-up, step, checkpoint or recovery
that has lasted longer than its limit makes it report which ranks
did not arrive and what each was doing (from their status files and this rank's Python
stacks), then abort the whole job with exit code 6 so that a supervisor can restart it.
Nothing waits forever.
"""

import faulthandler
import json
import os
import socket
import statistics
import sys
import threading
import time
from collections import deque
from pathlib import Path

from granger_mpi import rundir

(IDLE, STARTING, TRAINING, AGGREGATING, CHECKPOINTING, FAILED, RECOVERING, SPARE, FINISHING,
 VALIDATING) = ("IDLE", "STARTING", "TRAINING", "AGGREGATING", "CHECKPOINTING", "FAILED",
                "RECOVERING", "SPARE", "FINISHING", "VALIDATING")
STEP_STATES = (TRAINING, AGGREGATING)
SLOW_STATES = (CHECKPOINTING, RECOVERING, VALIDATING)
# Automatic step limit: this many times the median step, at least FLOOR_S; before enough
# steps have been timed (JIT compilation, first reads) the slow-phase limit applies.
AUTO_MULTIPLE = 50
AUTO_FLOOR_S = 60.0
AUTO_MIN_STEPS = 10
# A status write, and the watchdog's report before it aborts, may take this long at most:
# on a hung file system both would otherwise never return.
WRITE_DEADLINE_S = 2.0
REPORT_DEADLINE_S = 10.0


def status_dir(run_dir):
    return rundir.RunDir(run_dir).status


def status_path(run_dir, world_rank):
    return status_dir(run_dir) / f"rank-{world_rank:05d}.json"


class RankStatus:
    """This rank's state, published by a thread that is also the hang watchdog.

    ``step_timeout_s`` of 0 means automatic (``AUTO_MULTIPLE`` x the median step time);
    ``slow_timeout_s`` bounds a checkpoint or a recovery. ``abort`` ends the job (the CLI
    passes ``MPI.COMM_WORLD.Abort``).
    """

    def __init__(self, run_dir, world_rank, world_size, mode, *, interval_s=1.0,
                 step_timeout_s=0.0, slow_timeout_s=600.0, startup_timeout_s=600.0,
                 finish_timeout_s=1800.0, abort=None,
                 out=sys.stderr):
        self.run_dir = Path(run_dir)
        self.path = status_path(run_dir, world_rank)
        self.world_rank = world_rank
        self.world_size = world_size
        self.mode = mode
        self.interval_s = interval_s
        self.step_timeout_s = step_timeout_s
        self.slow_timeout_s = slow_timeout_s
        self.startup_timeout_s = startup_timeout_s
        self.finish_timeout_s = finish_timeout_s
        self.abort = abort
        self.out = out
        self.state, self.step, self.since = IDLE, 0, time.time()
        self.ranks_alive = world_size
        self.failures = 0
        self.note = ""
        self.step_times = deque(maxlen=100)
        self._step_started = None             # time.monotonic() of the current step's start
        self._entered = time.monotonic()      # ... and of entering the current state
        self._stop = threading.Event()
        self._thread = None
        self._writer = None                   # the thread of the last status write
        self._publishing = False              # from start(): the run directory is accepted

    # -- called by the training loop: attribute assignments only --------------------------

    def set(self, state, step=None, note=""):
        now = time.monotonic()
        if state == TRAINING:
            if self._step_started is not None and self.state in STEP_STATES:
                self.step_times.append(now - self._step_started)
            self._step_started = now
        elif state not in STEP_STATES:
            self._step_started = None
        self.state, self.since, self._entered, self.note = state, time.time(), now, note
        if step is not None:
            self.step = step
        if state in (FAILED, RECOVERING, IDLE, SPARE):
            self.publish()

    # -- the thread ----------------------------------------------------------------------

    def watch(self):
        """Start the watchdog thread, writing nothing yet (the run directory may still be
        refused: a rejected job creates none)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="granger-status", daemon=True)
            self._thread.start()
        return self

    def start(self):
        """Watch, and publish the status file from now on."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._publishing = True
        self.publish()
        return self.watch()

    def close(self, state=IDLE, note="finished"):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.set(state, note=note)

    def record(self):
        return {"rank": self.world_rank, "world_size": self.world_size, "host": socket.gethostname(),
                "pid": os.getpid(), "state": self.state, "step": self.step, "since": self.since,
                "updated": time.time(), "mode": self.mode, "ranks_alive": self.ranks_alive,
                "failures": self.failures, "note": self.note, "interval_s": self.interval_s}

    def publish(self):
        """Write the status file now, waiting at most ``WRITE_DEADLINE_S``: a hung file
        system (NFS, Lustre) must not hang the caller, the watchdog least of all. While an
        earlier write still hangs, this one is skipped (status is advisory)."""
        if not self._publishing or (self._writer is not None and self._writer.is_alive()):
            return
        self._writer = threading.Thread(target=_write_record, args=(self.path, self.record()),
                                        name="granger-status-write", daemon=True)
        self._writer.start()
        self._writer.join(WRITE_DEADLINE_S)

    def limit_s(self):
        """How long the current state may last."""
        if self.state == STARTING:
            return self.startup_timeout_s
        if self.state == FINISHING:
            return self.finish_timeout_s
        if self.state in SLOW_STATES:
            return self.slow_timeout_s
        if self.state not in STEP_STATES:
            return None
        if self.step_timeout_s:
            return self.step_timeout_s
        if len(self.step_times) < AUTO_MIN_STEPS:
            return self.slow_timeout_s
        return max(AUTO_FLOOR_S, AUTO_MULTIPLE * statistics.median(self.step_times))

    def _run(self):
        while not self._stop.wait(self.interval_s):
            limit = self.limit_s()     # first: nothing below may keep the limit from being seen
            started = self._step_started if self.state in STEP_STATES else self._entered
            if limit is not None and started is not None and time.monotonic() - started > limit:
                self._hang(limit, time.monotonic() - started)
                return
            self.publish()

    def _hang(self, limit, waited):
        """Report the hang (other ranks' status, this rank's stacks), for at most
        ``REPORT_DEADLINE_S``, and abort the job whatever the reporting did."""
        report = threading.Thread(target=self._report, args=(limit, waited), daemon=True,
                                  name="granger-watchdog-report")
        report.start()
        report.join(REPORT_DEADLINE_S)
        if self.abort is not None:
            self.abort(6)

    def _report(self, limit, waited):
        what = (f"step {self.step}" if self.state in STEP_STATES else
                f"the start-up ({self.note})" if self.state == STARTING else
                f"the end of the run ({self.note})" if self.state == FINISHING else self.state.lower())
        lines = [f"watchdog: {what} has not finished after {waited:.1f} s (limit {limit:.1f} s, "
                 f"[fault].startup_timeout_s / step_timeout_s / checkpoint_timeout_s / "
                 f"finish_timeout_s); rank "
                 f"{self.world_rank} is "
                 f"{self.state}{' (' + self.note + ')' if self.note else ''}"]
        records = read_all(self.run_dir)
        late = [r for r in records if r["rank"] != self.world_rank and _did_not_arrive(r, self.step)]
        if late:
            lines.append("watchdog: ranks that did not arrive: " + "; ".join(
                f"rank {r['rank']} ({r['state']} step {r['step']} for "
                f"{time.time() - r['since']:.1f} s, pid {r['pid']} on {r['host']}"
                f"{', no heartbeat for %.0f s' % (time.time() - r['updated']) if _stale(r) else ''})"
                for r in late))
        lines.append(f"watchdog: rank {self.world_rank} Python stacks follow; aborting the job "
                     f"(exit code 6) so that it can be restarted from the newest checkpoint")
        print("\n".join(lines), file=self.out, flush=True)
        faulthandler.dump_traceback(file=self.out, all_threads=True)
        self.out.flush()
        time.sleep(1.0)     # let the other ranks' watchdogs print their stacks too
        self.state, self.note = FAILED, f"hang detected by the watchdog ({what})"
        self.publish()


def _write_record(path, record):
    """Atomically, by rename; a full disk is not worth dying for (status is advisory)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(record))
        tmp.replace(path)
    except OSError:
        pass


def _stale(record, now=None):
    return (now or time.time()) - record["updated"] > 3 * record.get("interval_s", 1.0) + 2


def _did_not_arrive(record, step):
    if record["state"] == SPARE:
        return False
    if record["state"] in (FAILED, IDLE) or _stale(record):
        return True
    return record["step"] < step or (record["step"] == step and record["state"] != AGGREGATING)


def read_all(run_dir):
    """Every rank's last published status, by rank (unreadable files skipped)."""
    records = []
    for path in sorted(status_dir(run_dir).glob("rank-*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return records


def clear(run_dir, world_size):
    """Remove the status files of ranks a new run does not have (rank 0, at start)."""
    for path in status_dir(run_dir).glob("rank-*.json"):
        try:
            if int(path.stem.split("-")[1]) >= world_size:
                path.unlink(missing_ok=True)
        except ValueError:
            continue


def mark_failed(run_dir, world_ranks, note, step=None):
    """Record ranks that died (written by a survivor: the dead cannot)."""
    for rank in world_ranks:
        path = status_path(run_dir, rank)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            record = {"rank": rank, "host": "?", "pid": 0, "step": 0, "mode": "?",
                      "ranks_alive": 0, "failures": 0, "interval_s": 1.0}
        record.update(state=FAILED, since=time.time(), updated=time.time(), note=note,
                      step=step if step is not None else record.get("step", 0))
        _write_record(path, record)


def overview(run_dir, now=None):
    """The run as its status files tell it (``status`` and ``dashboard`` show this), or None
    without status files: every rank's record with ``shown`` (its state, or ``LOST?`` if it
    has been silent for 3 intervals), and ``alive``, ``failed``, ``step``, ``mode`` and
    ``phase`` (``running``, ``complete`` or ``not running``)."""
    now = now or time.time()
    records = read_all(run_dir)
    if not records:
        return None
    for r in records:
        r["shown"] = r["state"] if r["state"] in (FAILED, IDLE) or not _stale(r, now) else "LOST?"
    live = [r for r in records if r["state"] not in (FAILED, IDLE) and not _stale(r, now)]
    failed = [r for r in records if r["shown"] in (FAILED, "LOST?")]
    steps = [r["step"] for r in live] or [max(r["step"] for r in records)]
    complete = rundir.RunDir(run_dir).complete.exists()
    return dict(ranks=records, alive=len(live), failed=len(failed), step=max(steps),
                mode=records[0].get("mode", "?"),
                phase="running" if live else "complete" if complete else "not running")


def table(run_dir, now=None):
    """The text ``granger-mpi status RUN_DIR`` prints, and whether the run is still live."""
    now = now or time.time()
    run = overview(run_dir, now)
    if run is None:
        return None, False
    head = (f"run {run_dir}: {run['phase']}; mode {run['mode']}; {run['alive']} of "
            f"{len(run['ranks'])} rank(s) alive; step {run['step']}; {run['failed']} rank(s) failed")
    rows = [f"{'rank':>5} {'host':<16} {'pid':>8} {'state':<13} {'step':>8} {'for':>8} {'heartbeat':>10}  note"]
    for r in run["ranks"]:
        rows.append(f"{r['rank']:>5} {r['host'][:16]:<16} {r['pid']:>8} {r['shown']:<13} {r['step']:>8} "
                    f"{now - r['since']:>7.1f}s {now - r['updated']:>9.1f}s  {r.get('note', '')}")
    return "\n".join([head, *rows]), run["alive"] > 0
