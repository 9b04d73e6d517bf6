"""The optimizer of a run: its state buffer, learning-rate schedule, clipping and update.

The state is one flat float32 buffer of ``len(slots) * n_params`` elements (``velocity``
for SGD, ``m`` and ``v`` for Adam/AdamW), so it is copied, rolled back and checkpointed
as one piece. Nothing else is kept between steps: Adam's step count is the run's step
number, and the learning rate a pure function of it, so a resumed or rolled-back run
continues exactly.

Everything here runs after the allreduce on the summed gradient, which is bitwise
identical on every rank, so the global norm, the clipping and the update are too.
"""

import math

import numpy as np

from granger_mpi.kernels import optim

SLOTS = {"sgd": ("velocity",), "adam": ("m", "v"), "adamw": ("m", "v")}


def learning_rate(cfg, step, total_steps, global_batch):
    """The learning rate of (0-based) ``step`` under ``cfg`` (an ``OptimizerConfig``).

    Linear warm-up from ``base / warmup_steps`` to ``base`` over the first
    ``warmup_steps`` steps, then constant, ``base * gamma ** (step // step_size)``, or
    cosine from ``base`` down to ``min_learning_rate`` at the last step.
    """
    base = cfg.learning_rate
    if cfg.scale_with_batch:
        base *= global_batch / cfg.base_batch
    if step < cfg.warmup_steps:
        return base * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "step":
        return base * cfg.gamma ** (step // cfg.step_size)
    if cfg.schedule == "cosine":
        span = max(1, total_steps - 1 - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        floor = min(cfg.min_learning_rate, base)
        return floor + 0.5 * (base - floor) * (1.0 + math.cos(math.pi * progress))
    return base


class Optimizer:
    """One optimizer over a flat parameter buffer of ``n_params`` elements.

    With ``shard=(lo, hi)`` (ZeRO stage 1, see ``granger_mpi.model.zero``) it keeps state for
    ``params[lo:hi]`` only, and ``step``/``clip`` are given that slice.
    """

    def __init__(self, cfg, n_params, *, total_steps, global_batch, shard=None):
        self.cfg = cfg
        self.slots = SLOTS[cfg.name]
        self.n_params = n_params
        self.shard = shard
        lo, hi = shard if shard is not None else (0, n_params)
        self.n_local = hi - lo
        self.total_steps = total_steps
        self.global_batch = global_batch
        self.state = np.zeros(len(self.slots) * self.n_local, np.float32)

    def slot(self, name):
        """The view of one state tensor (``velocity``, ``m``, ``v``) over this rank's parameters."""
        i = self.slots.index(name)
        return self.state[i * self.n_local:(i + 1) * self.n_local]

    def adopt(self, state):
        """Take over a state read from a checkpoint (this rank's shard if sharded); returns it."""
        if state.shape != self.state.shape:
            raise ValueError(f"optimizer state of {state.size} elements; this optimizer keeps "
                             f"{self.state.size} ({len(self.slots)} slots x {self.n_local})")
        self.state = state
        return state

    def learning_rate(self, step):
        """The rate used by (0-based) ``step``."""
        return learning_rate(self.cfg, step, self.total_steps, self.global_batch)

    def clip(self, grad, comm=None):
        """Clip the summed gradient in place; returns its global norm before norm clipping.

        With ``comm``, ``grad`` is this rank's shard: the squares are summed over ``comm``
        in rank order (collective), so every rank gets the same norm.
        """
        cfg = self.cfg
        if cfg.clip_value is not None:
            optim.clip_by_value(grad, np.float32(cfg.clip_value))
        squares = optim.sum_of_squares(grad)
        if comm is not None:
            parts = np.empty(comm.Get_size(), np.float64)
            comm.Allgather(np.array([squares], np.float64), parts)
            squares = sum(parts.tolist())
        norm = math.sqrt(squares)
        if cfg.clip_norm is not None and norm > cfg.clip_norm:
            optim.scale(grad, np.float32(cfg.clip_norm / (norm + 1e-6)))  # PyTorch's factor
        return norm

    def step(self, params, grad, step):
        """Apply (0-based) ``step``'s update to ``params`` in place; returns the rate used."""
        cfg = self.cfg
        lr = self.learning_rate(step)
        if cfg.name == "sgd":
            optim.sgd_momentum(params, grad, self.state, np.float32(lr), np.float32(cfg.momentum),
                               np.float32(cfg.weight_decay), cfg.nesterov)
        else:
            optim.adam(params, grad, self.slot("m"), self.slot("v"), lr, cfg.beta1, cfg.beta2,
                       cfg.eps, cfg.weight_decay, step + 1, cfg.name == "adamw")
        return lr

    def warm(self):
        """Compile (or load) every kernel this optimizer may call, on throw-away buffers."""
        x = np.zeros(2, np.float32)
        optim.clip_by_value(x, np.float32(1))
        optim.scale(x, np.float32(1))
        optim.sum_of_squares(x)
        if self.cfg.name == "sgd":
            optim.sgd_momentum(x, x.copy(), x.copy(), np.float32(0), np.float32(0), np.float32(0),
                               self.cfg.nesterov)
        else:
            optim.adam(x, x.copy(), x.copy(), x.copy(), 0.0, 0.9, 0.999, 1e-8, 0.0, 1, False)
