"""``TrainState``: what one training step changes, with a commit to roll back to."""

import numpy as np

from granger_mpi import checkpoint


class TrainState:
    """Parameters, optimizer state (this rank's shard if sharded) and the steps completed.

    ``commit()`` before an update keeps a copy of both buffers, and ``restore()`` puts it
    back: after a rank failure, a survivor that applied a step the others did not finish
    rolls back to the step all of them completed. Only a run that can recover (ULFM) keeps
    the copy, which costs a second model in memory; ``rollback=False`` makes both no-ops.
    """

    def __init__(self, params: np.ndarray, opt_state: np.ndarray, step: int, *, rollback: bool):
        self.params = params
        self.opt_state = opt_state
        self.step = step            # steps whose update this rank has applied
        self._committed = (params.copy(), opt_state.copy()) if rollback else None

    def commit(self) -> None:
        """Remember the state as it is now, before the update of step ``self.step``."""
        if self._committed is not None:
            np.copyto(self._committed[0], self.params)
            np.copyto(self._committed[1], self.opt_state)

    def restore(self, step: int) -> None:
        """Go back to ``step`` steps completed: the committed state, one step back at most."""
        if step == self.step:
            return
        if self._committed is None or step != self.step - 1:
            raise RuntimeError(f"cannot roll back from step {self.step} to {step}: only the "
                               f"last committed step can be restored")
        np.copyto(self.params, self._committed[0])
        np.copyto(self.opt_state, self._committed[1])
        self.step = step

    def snapshot(self, steps_per_epoch: int, slots: tuple, shard: tuple | None) -> checkpoint.Snapshot:
        """The state as a checkpoint holds it (views, not copies)."""
        return checkpoint.Snapshot(self.params, self.opt_state, self.step, self.step // steps_per_epoch,
                                   self.step % steps_per_epoch, slots, shard)
