"""An example of a model of your own: "wide and deep", a hidden ReLU layer plus a linear path
from the inputs straight to the logits, with softmax cross-entropy:

    logits = relu(X W1 + b1) W2 + X V + b2

Use it with ``[model].kind = "widedeep:make"`` and ``[model].options = {hidden = 64}``, with
this directory on PYTHONPATH (``jobs/custom.toml`` says how). The kernels are Numba, built from
granger-mpi's own dense layers and loss head (``granger_mpi.kernels.mlp``); check the gradient
of a model of your own the same way as ``check()`` below.
"""

import numpy as np
from numba import njit

from granger_mpi.kernels import mlp
from granger_mpi.model.custom import CustomModel, check_gradient


@njit(cache=True, nogil=True)
def _forward(X, W1, b1, W2, V, b2):
    n, none = X.shape[0], np.empty((0, 0), X.dtype)
    H = np.empty((n, W1.shape[1]), X.dtype)
    mlp.layer_forward(X, W1, b1, True, mlp.RELU, H, none)
    out = np.empty((n, W2.shape[1]), X.dtype)
    mlp.layer_forward(H, W2, b2, False, mlp.RELU, out, none)
    out += np.dot(X, V)
    return H, out


@njit(cache=True, nogil=True)
def loss_grad(X, labels, scale, W1, b1, W2, V, b2, gW1, gb1, gW2, gV, gb2):
    H, out = _forward(X, W1, b1, W2, V, b2)
    none = np.empty((0, 0), X.dtype)
    dZ = np.empty_like(out)
    loss, correct = mlp.softmax_cross_entropy(out, labels, scale, dZ, True)
    dH = np.empty_like(H)
    mlp.layer_backward(H, W2, dZ, gW2, gb2, mlp.RELU, none, dH)
    np.dot(X.T, dZ, gV)
    mlp.layer_backward(X, W1, dH, gW1, gb1, mlp.RELU, none, none)
    return loss, correct


@njit(cache=True, nogil=True)
def loss(X, labels, W1, b1, W2, V, b2):
    _, out = _forward(X, W1, b1, W2, V, b2)
    return mlp.softmax_cross_entropy(out, labels, 1.0, out, False)


class WideDeep(CustomModel):
    def __init__(self, hidden, **kwargs):
        super().__init__(**kwargs)
        self.hidden = hidden

    def tensors(self):
        d, h, k = self.n_features, self.hidden, self.n_outputs
        return [("V", (d, k)), ("W1", (d, h)), ("b1", (h,)), ("W2", (h, k)), ("b2", (k,))]

    def _views(self, flat):
        v = self.layout.views(flat)
        return v["W1"], v["b1"], v["W2"], v["V"], v["b2"]

    def loss_grad(self, params, X, y, scale, grad):
        W1, b1, W2, V, b2 = self._views(params)
        gW1, gb1, gW2, gV, gb2 = self._views(grad)
        return loss_grad(X, y, np.float32(scale), W1, b1, W2, V, b2, gW1, gb1, gW2, gV, gb2)

    def loss(self, params, X, y):
        return loss(X, y, *self._views(params))

    def predict(self, params, X):
        return _forward(X, *self._views(params))[1]


def make(*, n_features, n_outputs, task, hidden=64):
    """The factory granger-mpi calls; ``hidden`` comes from ``[model].options``."""
    if task != "classification":
        raise ValueError(f"widedeep is a classifier; the dataset is {task}")
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"options.hidden must be a positive integer, got {hidden!r}")
    return WideDeep(hidden, kind=f"{__name__}:make", n_features=n_features, n_outputs=n_outputs,
                    task=task, options={"hidden": hidden})


def check(rows=64, features=12, classes=4, seed=0):
    """The gradient against finite differences on random data; returns the relative error."""
    rng = np.random.default_rng(seed)
    model = make(n_features=features, n_outputs=classes, task="classification", hidden=16)
    X = rng.normal(size=(rows, features))
    y = rng.integers(0, classes, rows).astype(np.int32)
    return check_gradient(model, X, y, seed=seed)


if __name__ == "__main__":
    print(f"widedeep: gradient within {check():.2g} of finite differences")
