"""Bucketed allreduce that overlaps with the computation producing the buffer.

Backward writes a gradient from its end towards its start, one layer at a time. The buffer
is cut into buckets (``plan``), and each is summed as soon as backward has finished it, by a
communication thread, while backward goes on with the layers below (the kernels release the
GIL, and mpi4py releases it inside MPI calls).

Determinism: bucket boundaries are a pure function of the layer boundaries and the bucket
size, each bucket's algorithm is decided once for all ranks (``auto.choose`` is collective),
and every rank sums the buckets in the same order with the same algorithms. So the result
is bitwise the same with and without the thread (``overlap=False`` sums the same buckets
after backward), and the same on every rank.

MPI: while the thread sums, the caller makes no MPI call on the communicator (it computes,
then ``wait``s), so each bucket is one collective in a fixed order; an MPI error in any
bucket ends the step's exchange on this rank and is raised by ``wait``.
"""

import queue
import threading
import time

from granger_mpi.collectives import allreduce as _allreduce

_DONE = None
# [collectives].bucket_mb = "auto" across nodes: messages a link carries near its rate.
AUTO_BUCKET_MB = 1.0


def plan(boundaries, length, bucket_elements):
    """``(lo, hi)`` buckets covering ``range(length)``, from the end of the buffer down.

    ``boundaries`` are the offsets at which backward finishes a part of the buffer (the part
    from there to the end is final), in descending order, ending with 0. Parts are grouped
    from the end while a bucket stays within ``bucket_elements``; a part longer than that is
    cut into near-equal pieces of at most ``bucket_elements`` (they become final together).
    """
    if bucket_elements < 1:
        raise ValueError(f"bucket size must be at least one element, got {bucket_elements}")
    buckets = []
    hi = length          # the end of the bucket being filled
    top = length         # the end of the part below the previous boundary
    for lo in boundaries:
        part = top - lo
        if hi - top + part <= bucket_elements:       # the part fits into the open bucket
            top = lo
            continue
        if hi > top:                                  # close the open bucket at this part
            buckets.append((top, hi))
            hi = top
        if part > bucket_elements:                    # cut a long part into pieces
            pieces = -(-part // bucket_elements)
            cuts = [lo + part * i // pieces for i in range(pieces, -1, -1)]
            buckets.extend(zip(cuts[1:], cuts[:-1]))
            hi = lo
        top = lo
    if hi > top:
        buckets.append((top, hi))
    return buckets


class BucketedAllreduce:
    """Sums ``buf`` over ``comm`` in the ``buckets`` of ``plan``, each with its algorithm
    (and compression, ``"none"`` unless given).

    Per step: ``ready(offset)`` whenever ``buf[offset:]`` is final, then ``wait()``. With
    ``overlap``, a thread sums each bucket as soon as it is final; without, ``wait`` sums
    them all. ``spans`` keeps, for the buckets of the latest step, ``(lo, hi, start, end)``
    in ``time.perf_counter`` seconds (for the timeline).
    """

    def __init__(self, comm, buf, buckets, algorithms, *, overlap=True, ranks_per_node=None,
                 compressions=None):
        compressions = compressions or ["none"] * len(buckets)
        if not len(algorithms) == len(compressions) == len(buckets):
            raise ValueError("one algorithm and one compression per bucket")
        self.comm, self.buf = comm, buf
        self.buckets, self.algorithms = list(buckets), list(algorithms)
        self.compressions = list(compressions)
        self.ranks_per_node = ranks_per_node
        self.overlap = overlap
        self.spans = []
        self._next = 0                 # the first bucket not handed to the summer yet
        self._error = None
        self._queue = queue.SimpleQueue() if overlap else None
        self._thread = None

    def _sum(self, index):
        lo, hi = self.buckets[index]
        start = time.perf_counter()
        _allreduce(self.comm, self.buf[lo:hi], algorithm=self.algorithms[index],
                   ranks_per_node=self.ranks_per_node, compression=self.compressions[index])
        self.spans.append((lo, hi, start, time.perf_counter()))

    def _run(self):
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            index, finished = item
            if index is not None and self._error is None:
                try:
                    self._sum(index)
                except BaseException as exc:   # raised again, in the caller, by wait()
                    self._error = exc
            if finished is not None:
                finished.set()

    def ready(self, offset):
        """``buf[offset:]`` is final: hand the buckets it completes to the summer."""
        if not self.overlap:
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="granger-exchange", daemon=True)
            self._thread.start()
        while self._next < len(self.buckets) and self.buckets[self._next][0] >= offset:
            self._queue.put((self._next, None))
            self._next += 1

    def wait(self):
        """Sum what is left; return when every bucket is summed (raises the first error)."""
        if not self.overlap:
            for index in range(len(self.buckets)):
                self._sum(index)
            return
        self.ready(0)
        finished = threading.Event()
        self._queue.put((None, finished))   # after every bucket of this step
        finished.wait()
        error, self._error, self._next = self._error, None, 0
        if error is not None:
            raise error

    def take_spans(self):
        """The latest step's ``spans``, which then start afresh."""
        spans, self.spans = self.spans, []
        return spans

    def close(self):
        """Stop the thread. It is idle between steps; one still inside a bucket (the caller
        failed mid-step) is left to end with the process, as a daemon."""
        if self._thread is not None:
            self._queue.put(_DONE)
            self._thread.join(timeout=5)
            self._thread = None
