"""A timeline of a window of steps, as Chrome trace JSON (``chrome://tracing``, Perfetto).

Each rank is a process of the trace with two tracks: ``compute`` (forward, each layer's
backward, the optimizer) and ``exchange`` (each bucket's allreduce, and the time the step
waited for the exchange to end), so the overlap of the two can be seen, not guessed.
Times are microseconds from a barrier at the window's start (the ranks' clocks are each
their own; the barrier aligns them to within its skew).
"""

import json
import time

from granger_mpi.mpi.runtime import gather_text

COMPUTE, EXCHANGE = 0, 1
TRACKS = {COMPUTE: "compute", EXCHANGE: "exchange"}


class Timeline:
    """Spans of steps ``first .. first + steps - 1``; ``write`` after the last of them."""

    def __init__(self, first, steps):
        self.first, self.last = first, first + steps - 1
        self.events = []
        self.origin = None

    def covers(self, step):
        return self.first <= step <= self.last

    def begin(self, comm):
        """Collective: the window starts now on every rank."""
        comm.Barrier()
        self.origin = time.perf_counter()

    def span(self, name, track, start, end, **args):
        """A span in ``perf_counter`` seconds on ``track`` (``COMPUTE``, ``EXCHANGE``)."""
        self.events.append((name, track, start, end, args))

    def write(self, comm, path, idents):
        """Collective: every rank's spans into one trace file at ``path`` (rank 0 writes);
        ``idents`` names each rank's process (its world rank)."""
        rank = comm.Get_rank()
        mine = [{"name": name, "ph": "X", "pid": rank, "tid": track, "args": args,
                 "ts": round((start - self.origin) * 1e6, 1), "dur": round((end - start) * 1e6, 1)}
                for name, track, start, end, args in self.events]
        everyone = gather_text(comm, json.dumps(mine))
        self.events = []
        if not everyone:      # not rank 0
            return
        events = []
        for r, text in enumerate(everyone):
            events.append({"name": "process_name", "ph": "M", "pid": r,
                           "args": {"name": f"rank {r} (world rank {idents[r]})"}})
            events.extend({"name": "thread_name", "ph": "M", "pid": r, "tid": t, "args": {"name": n}}
                          for t, n in TRACKS.items())
            events.extend(json.loads(text))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
