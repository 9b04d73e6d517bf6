"""One training step's arithmetic: compute the gradient, exchange it, apply it.

The exchange buffer holds the gradient followed by ``N_STATS`` statistics (loss, correct
predictions, a bad-data flag, the save and stop requests), so a step costs exactly one
allreduce and every rank sees the same numbers.
"""

import numpy as np
from mpi4py import MPI

from granger_mpi import collectives
from granger_mpi.model import models, zero
from granger_mpi.training.evaluation import first_bad_row

N_STATS = 5
LOSS, CORRECT, BAD, SAVE, STOP = range(N_STATS)


class StepRunner:
    """Owns the exchange buffer of a run; ``compute``, then ``exchange``, then ``apply``."""

    def __init__(self, comm: MPI.Comm, model, info, opt, *, micro_batches: int, sharded: bool,
                 shared_memory: bool, ranks_per_node: int | None):
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
        if rows.size:
            loss_sum, correct = models.loss_grad_in_micro_batches(
                self.model, params, X, y, scale, self.grad, self.micro_batches, self.micro_grad)
        else:
            self.grad[:] = 0
            loss_sum, correct = 0.0, 0
        self.stats[LOSS] = loss_sum / batch_len
        self.stats[CORRECT] = correct / batch_len
        self.stats[BAD] = 0
        return -1

    def refuse(self) -> int:
        """This rank's rows could not be read intact: contribute nothing but the flag."""
        self.exchange_buffer[:] = 0
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
        collectives.allreduce(comm, self.exchange_buffer, algorithm=algorithm,
                              ranks_per_node=self.ranks_per_node)
        return None

    def apply(self, params: np.ndarray, step_index: int) -> tuple[float, float]:
        """The optimizer's update with the summed gradient: ``(gradient norm, learning rate)``."""
        grad_norm = self.opt.clip(self.grad)
        return grad_norm, self.opt.step(params, self.grad, step_index)

    def flag(self, index: int) -> bool:
        """Whether any rank set statistic ``index`` (``BAD``, ``SAVE``, ``STOP``)."""
        return self.stats[index] > 0

    def loss_and_accuracy(self) -> tuple[float, float | None]:
        loss = float(self.stats[LOSS])
        return loss, (float(self.stats[CORRECT]) if self.info.task == "classification" else None)
