"""One training step's arithmetic: compute the gradient, exchange it, apply it.

The exchange buffer holds the gradient followed by ``N_STATS`` statistics (loss, correct
predictions, a bad-data flag, the save and stop requests), so the statistics travel with
the gradient and every rank sees the same numbers. With buckets (``[collectives].bucket_mb``)
the buffer is summed in pieces, the statistics in the first, and with ``overlap`` each
piece as soon as backward has finished it (``collectives.overlap``).
"""

import time

import numpy as np
from mpi4py import MPI

from granger_mpi import collectives
from granger_mpi.collectives import overlap
from granger_mpi.model import models, zero
from granger_mpi.observe import trace
from granger_mpi.training.evaluation import first_bad_row

N_STATS = 5
LOSS, CORRECT, BAD, SAVE, STOP = range(N_STATS)


class StepRunner:
    """Owns the exchange buffer of a run; ``compute``, then ``exchange``, then ``apply``."""

    def __init__(self, comm: MPI.Comm, model, info, opt, *, micro_batches: int, sharded: bool,
                 shared_memory: bool, ranks_per_node: int | None, bucket_bytes: int = 0,
                 overlapped: bool = False, compression: str = "none"):
        n = model.layout.size
        # Under ULFM, a plain buffer: shared-memory windows cannot be repaired after a failure.
        self.exchange_buffer = (collectives.allocate(comm, n + N_STATS, np.float32) if shared_memory
                                else np.zeros(n + N_STATS, np.float32))
        self.grad, self.stats = self.exchange_buffer[:n], self.exchange_buffer[n:]
        self.model, self.info, self.opt = model, info, opt
        self.micro_batches = micro_batches
        self.micro_grad = np.empty(n, np.float32) if micro_batches > 1 else None
        self.sharded = sharded
        self.ranks_per_node = ranks_per_node
        # Buckets: cut where backward finishes a layer (ZeRO-1 sums its buffer whole). With
        # compression the statistics are a float32 bucket of their own, summed first.
        self.compression = compression
        cap = max(1, bucket_bytes // 4) if bucket_bytes > 0 else n + N_STATS
        ends = model.backward_boundaries
        if sharded or (bucket_bytes <= 0 and compression == "none"):
            self.buckets = None
        elif compression == "none":
            self.buckets = overlap.plan(ends, n + N_STATS, cap)
        else:
            self.buckets = [(n, n + N_STATS)] + overlap.plan(ends, n, cap)
        # A model of the user's own without a per-layer backward sums its buckets after it.
        self.overlapped = (overlapped and self.buckets is not None
                           and hasattr(model, "loss_grad_by_layer"))
        self.exchanger = None
        self.timeline = None      # a trace.Timeline while a traced step runs

    def _span(self, name, track, start, **args):
        """Record a span from ``start`` to now if this step is traced; returns now."""
        now = time.perf_counter()
        if self.timeline is not None:
            self.timeline.span(name, track, start, now, **args)
        return now

    def connect(self, comm: MPI.Comm, algorithm: str, candidates: tuple) -> str:
        """Collective: prepare the exchange on ``comm`` (at the start, and on the
        communicator of the survivors after a failure); ``auto`` decides each bucket's
        algorithm among ``candidates`` once, for all ranks. Returns what it will run."""
        if self.exchanger is not None:
            self.exchanger.close()
            self.exchanger = None
        if self.buckets is None:
            return algorithm
        n = self.grad.size
        compressions = [self.compression if hi <= n else "none" for lo, hi in self.buckets]
        chosen = ["ring" if c != "none" else
                  collectives.auto.choose(comm, (hi - lo) * 4, candidates) if algorithm == "auto"
                  else algorithm for (lo, hi), c in zip(self.buckets, compressions)]
        self.exchanger = overlap.BucketedAllreduce(comm, self.exchange_buffer, self.buckets, chosen,
                                                   overlap=self.overlapped,
                                                   ranks_per_node=self.ranks_per_node,
                                                   compressions=compressions)
        names = [f"{a} {c}" if c != "none" else a for a, c in zip(chosen, compressions)]
        names = sorted(set(names), key=names.index)
        return (f"{algorithm if algorithm != 'auto' else 'auto (' + ', '.join(names) + ')'} in "
                f"{len(self.buckets)} bucket(s) of at most {max(hi - lo for lo, hi in self.buckets) * 4:,} "
                f"bytes, {'overlapped with backward' if self.overlapped else 'after backward'}"
                + (f", gradient in {self.compression} on the wire" if self.compression != "none" else ""))

    def close(self) -> None:
        if self.exchanger is not None:
            self.exchanger.close()

    @property
    def nbytes(self) -> int:
        return self.exchange_buffer.nbytes

    def compute(self, params: np.ndarray, rows: np.ndarray, X, y, batch_len: int) -> int:
        """This rank's share of the step's gradient and statistics (loss and correct
        predictions as fractions of the global batch). Returns the index of the first bad
        row of the batch, or -1; a bad batch contributes nothing but its flag."""
        bad = first_bad_row(self.info, X, y) if rows.size else -1
        if bad >= 0:
            self.refuse()
            return bad
        scale = np.float32(1.0 / batch_len)
        self.stats[BAD] = 0
        if not rows.size:
            self.grad[:] = 0
            self.stats[LOSS] = self.stats[CORRECT] = 0
        elif self.overlapped:
            start = time.perf_counter()
            loss_sum, correct, layers = models.loss_grad_by_layer_in_micro_batches(
                self.model, params, X, y, scale, self.grad, self.micro_batches, self.micro_grad)
            self._statistics(loss_sum, correct, batch_len)   # they travel in the first bucket
            start = self._span("forward", trace.COMPUTE, start)
            for layer, offset in zip(range(len(self.model.backward_boundaries), 0, -1), layers):
                start = self._span(f"backward {layer}", trace.COMPUTE, start)
                self.exchanger.ready(offset)
        else:
            start = time.perf_counter()
            loss_sum, correct = models.loss_grad_in_micro_batches(
                self.model, params, X, y, scale, self.grad, self.micro_batches, self.micro_grad)
            self._statistics(loss_sum, correct, batch_len)
            self._span("forward and backward", trace.COMPUTE, start)
        return -1

    def _statistics(self, loss_sum, correct, batch_len):
        self.stats[LOSS] = loss_sum / batch_len
        self.stats[CORRECT] = correct / batch_len

    def refuse(self) -> int:
        """This rank's rows could not be read intact: contribute nothing but the flag."""
        self.grad[:] = 0
        self.stats[LOSS] = self.stats[CORRECT] = 0
        self.stats[BAD] = 1
        return -1

    def request(self, save: bool, stop: bool) -> None:
        """This rank's save and stop requests, summed with the others' by the exchange."""
        self.stats[SAVE] = 1 if save else 0
        self.stats[STOP] = 1 if stop else 0

    def exchange(self, comm: MPI.Comm, algorithm: str, params: np.ndarray, step_index: int):
        """Collective: sum the buffer over ``comm`` in place. With a sharded optimizer the
        update happens inside (between reduce-scatter and allgather): returns its
        ``(gradient norm, learning rate)``; otherwise None, and ``apply`` follows."""
        if self.sharded:
            return zero.exchange_and_update(comm, self.opt, self.exchange_buffer, params, step_index)
        start = time.perf_counter()
        if self.exchanger is None:
            collectives.allreduce(comm, self.exchange_buffer, algorithm=algorithm,
                                  ranks_per_node=self.ranks_per_node)
            self._span("allreduce", trace.EXCHANGE, start, bytes=self.nbytes)
            return None
        self.exchanger.wait()
        self._span("waiting for the exchange", trace.COMPUTE, start)
        for k, (lo, hi, begun, ended) in enumerate(self.exchanger.take_spans()):
            if self.timeline is not None:
                self.timeline.span(f"bucket {k}", trace.EXCHANGE, begun, ended, bytes=(hi - lo) * 4)
        return None

    def apply(self, params: np.ndarray, step_index: int) -> tuple[float, float]:
        """The optimizer's update with the summed gradient: ``(gradient norm, learning rate)``."""
        start = time.perf_counter()
        grad_norm = self.opt.clip(self.grad)
        lr = self.opt.step(params, self.grad, step_index)
        self._span("optimizer", trace.COMPUTE, start)
        return grad_norm, lr

    def flag(self, index: int) -> bool:
        """Whether any rank set statistic ``index`` (``BAD``, ``SAVE``, ``STOP``)."""
        return self.stats[index] > 0

    def loss_and_accuracy(self) -> tuple[float, float | None]:
        loss = float(self.stats[LOSS])
        return loss, (float(self.stats[CORRECT]) if self.info.task == "classification" else None)
