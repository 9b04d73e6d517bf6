"""Models of your own: ``[model].kind = "package.module:factory"``.

The factory is imported on every rank (the module must be importable: installed, or its
directory on ``PYTHONPATH``) and called as ``factory(n_features=..., n_outputs=..., task=...,
**options)``, with ``[model].options`` (a TOML table) as keyword arguments. It returns a
``CustomModel``. A subclass gives:

- ``tensors()``: the parameters as ``[(name, shape), ...]``, laid end to end in this order in
  one flat float32 buffer (``layout`` names the views);
- ``loss_grad(params, X, y, scale, grad)``: write ``scale`` times the sum over the rows of
  each row's loss gradient into ``grad`` (every element), and return ``(loss sum, correct
  predictions)`` (0 for regression). ``y`` holds int32 labels (classification) or float32
  targets (rows x outputs, regression);
- ``predict(params, X)``: the raw outputs, rows x ``n_outputs`` (logits for classification);
- and may override ``init_params(seed)`` (default: a seeded normal of std 1/sqrt(fan-in)
  for 2-D tensors, zeros for the others) and ``loss(params, X, y)`` (default: ``loss_grad``
  into a scratch buffer).

The kernels should be pure functions of their arrays, and deterministic: then every
guarantee holds for the model as for the built-in ones (bit-identical parameters at a fixed
number of ranks, checkpoints and resume, rank failures under ULFM and spares). Numba
``@njit(nogil=True)`` kernels run at the speed of the built-in ones;
``granger_mpi.kernels.mlp`` has dense layers and loss heads to build from.
``check_gradient(model, X, y)`` compares ``loss_grad`` with finite differences of ``loss``.
"""

import math

import numpy as np

from granger_mpi import factories
from granger_mpi.errors import UserError
from granger_mpi.model.layout import end_to_end


class CustomModel:
    """The base class of a user's model (see the module's docstring)."""

    def __init__(self, *, kind, n_features, n_outputs, task, options):
        self.kind = kind
        self.n_features, self.n_outputs, self.task = n_features, n_outputs, task
        self.options = dict(options)
        self.binary = False
        self.sizes = (n_features, n_outputs)       # what the log line and predict show

    def tensors(self):
        raise NotImplementedError

    def loss_grad(self, params, X, y, scale, grad):
        raise NotImplementedError

    def predict(self, params, X):
        raise NotImplementedError

    @property
    def layout(self):
        if getattr(self, "_layout", None) is None:
            self._layout = end_to_end(self.tensors())
        return self._layout

    @property
    def backward_boundaries(self):
        """Where ``grad`` becomes final during backward: at its end only (no overlap)."""
        return [0]

    def spec(self):
        return {"kind": self.kind, "n_features": self.n_features, "n_outputs": self.n_outputs,
                "task": self.task, "options": self.options}

    def fits(self, info):
        if (info.n_features, info.n_outputs, info.task) != (self.n_features, self.n_outputs, self.task):
            return (f"{info.path} ({info.n_features} features, {info.task}, {info.n_outputs} "
                    f"outputs) does not fit the model {self.kind} ({self.n_features} features, "
                    f"{self.task}, {self.n_outputs} outputs)")
        return None

    def init_params(self, seed, dtype=np.float32):
        rng = np.random.Generator(np.random.PCG64([seed, 0x6D6F64656C]))
        flat = np.zeros(self.layout.size, dtype)
        for tensor, view in zip(self.layout.tensors, self.layout.views(flat).values()):
            if len(tensor.shape) == 2:
                view[...] = rng.normal(0.0, 1.0 / math.sqrt(tensor.shape[0]), tensor.shape)
        return flat

    def loss(self, params, X, y):
        return self.loss_grad(params, X, y, np.float32(1.0), np.empty_like(params))

    def predict_labels(self, outputs):
        return outputs.argmax(axis=1).astype(np.int32)


def is_custom(kind):
    return ":" in kind


def build(kind, options, *, n_features, n_outputs, task):
    """The model ``factory(n_features=, n_outputs=, task=, **options)`` of ``kind`` returns;
    a ``UserError`` naming ``kind`` for anything that goes wrong."""
    where = f"[model].kind = {kind!r}"
    factory = factories.load(kind, where)
    try:
        model = factory(n_features=n_features, n_outputs=n_outputs, task=task, **options)
    except Exception as exc:    # noqa: BLE001 - a user's code: any failure is bad input
        raise UserError(f"{where} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, CustomModel):
        raise UserError(f"{where} returned {type(model).__name__}, not a "
                        f"granger_mpi.model.custom.CustomModel")
    try:
        size = model.layout.size
    except Exception as exc:    # noqa: BLE001
        raise UserError(f"{where}: its tensors() failed: {type(exc).__name__}: {exc}") from None
    if size < 1:
        raise UserError(f"{where}: its tensors() hold no parameters")
    return model


def gradient_error(model, X, y, *, params=None, coordinates=64, steps=(1e-4, 1e-5, 1e-6), seed=0):
    """The largest relative error of ``model.loss_grad`` against central finite differences
    of ``model.loss``, at ``coordinates`` parameters drawn at random, at ``params`` (default:
    ``init_params(seed)``).

    Computed in float64 (float32's rounding of the loss swamps differences small enough to
    miss ReLU's kink), so the model's kernels must accept float64 arrays: allocate their
    work arrays with ``X.dtype``. Each coordinate counts its best agreement over the
    difference ``steps`` (a step may still cross a kink; a wrong gradient is wrong at every
    step). Errors are relative to the larger of the two derivatives, and to at least 1e-6
    per row (the loss is a sum over the rows)."""
    X = np.ascontiguousarray(X, np.float64)
    params = (model.init_params(seed, np.float64) if params is None
              else np.ascontiguousarray(params, np.float64))
    grad = np.empty_like(params)
    model.loss_grad(params, X, y, 1.0, grad)
    rng = np.random.default_rng(seed)
    worst = 0.0
    for i in rng.choice(params.size, size=min(coordinates, params.size), replace=False):
        best = math.inf
        for eps in steps:
            probe = params.copy()
            probe[i] = params[i] + eps
            up = float(model.loss(probe, X, y)[0])
            probe[i] = params[i] - eps
            numeric = (up - float(model.loss(probe, X, y)[0])) / (2 * eps)
            scale = max(abs(numeric), abs(float(grad[i])), 1e-6 * len(X))
            best = min(best, abs(numeric - float(grad[i])) / scale)
        worst = max(worst, best)
    return worst


def check_gradient(model, X, y, *, tolerance=1e-5, **kwargs):
    """``gradient_error``; raises ``AssertionError`` naming it if it is above ``tolerance``."""
    error = gradient_error(model, X, y, **kwargs)
    if not error <= tolerance:
        raise AssertionError(f"{model.kind}: the gradient differs from finite differences by "
                             f"{error:.3g} (relative), above {tolerance:g}")
    return error
