"""Models as a layout of named views over one flat parameter buffer, plus their kernels."""

import functools
import math
from dataclasses import dataclass

import numpy as np

from granger_mpi.kernels import mlp
from granger_mpi.model import custom
from granger_mpi.model.layout import end_to_end

ACTIVATIONS = {"relu": mlp.RELU, "tanh": mlp.TANH, "gelu": mlp.GELU}
# Kernels by loss: softmax cross-entropy, logistic on one logit, half squared error.
LOSS_GRAD = {"classification": mlp.cross_entropy_loss_grad, "binary": mlp.binary_cross_entropy_loss_grad,
             "regression": mlp.squared_error_loss_grad}
LOSS = {"classification": mlp.cross_entropy_loss, "binary": mlp.binary_cross_entropy_loss,
        "regression": mlp.squared_error_loss}
HEADS = {"classification": mlp.softmax_cross_entropy, "binary": mlp.logistic,
         "regression": mlp.half_squared_error}


def mlp_layout(sizes):
    """``W1, b1, W2, b2, ...`` in the order the MLP kernels expect."""
    shapes = []
    for layer, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        shapes += [(f"W{layer}", (d_in, d_out)), (f"b{layer}", (d_out,))]
    return end_to_end(shapes)


@dataclass(frozen=True)
class Model:
    """A network of ``sizes`` with its loss; stateless, parameters live in a flat buffer."""

    kind: str
    sizes: tuple
    activation: str
    task: str  # "classification" (softmax cross-entropy) or "regression" (squared error)

    @functools.cached_property
    def layout(self):
        """The named views of the parameter buffer (made once: a checkpoint asks for it on
        its path)."""
        return mlp_layout(self.sizes)

    @property
    def backward_boundaries(self):
        """The offsets at which backward finishes a layer's gradient (the part from there to
        the end of the buffer is final), last layer first: where buckets are cut."""
        return [t.offset for t in self.layout.tensors[-2::-2]]

    def spec(self):
        """A JSON-able description from which ``from_spec`` rebuilds the model."""
        return {"kind": self.kind, "sizes": list(self.sizes), "activation": self.activation,
                "task": self.task}

    @property
    def binary(self):
        """Logistic regression: one output logit for two classes, binary cross-entropy."""
        return self.kind == "logistic"

    def fits(self, info):
        """None if the dataset ``info`` fits this model, else what does not fit."""
        outputs = 2 if self.binary else self.sizes[-1]
        if info.n_features != self.sizes[0] or info.task != self.task or info.n_outputs != outputs:
            return (f"{info.path} ({info.n_features} features, {info.task}, {info.n_outputs} "
                    f"outputs) does not fit a model of sizes {list(self.sizes)} ({self.kind}, {self.task})")
        return None

    def init_params(self, seed, dtype=np.float32):
        """Seeded He (ReLU, GELU) or Glorot (tanh) weights and zero biases."""
        rng = np.random.Generator(np.random.PCG64([seed, 0x6D6F64656C]))
        flat = np.zeros(self.layout.size, dtype)
        views = self.layout.views(flat)
        for layer, (d_in, d_out) in enumerate(zip(self.sizes[:-1], self.sizes[1:]), start=1):
            gain = 2.0 / (d_in + d_out) if self.activation == "tanh" else 2.0 / d_in
            views[f"W{layer}"][...] = rng.normal(0.0, math.sqrt(gain), (d_in, d_out))
        return flat

    def _loss_kind(self):
        return "binary" if self.binary else self.task

    def loss_grad(self, params, X, y, scale, grad):
        """Write ``scale * sum of per-row gradients`` into ``grad``; return (loss sum, correct)."""
        return LOSS_GRAD[self._loss_kind()](params, np.asarray(self.sizes, np.int64),
                                            ACTIVATIONS[self.activation], X, y, scale, grad)

    def loss_grad_by_layer(self, params, X, y, scale, grad):
        """``loss_grad`` one layer at a time, last layer first, bitwise the same.

        Runs the forward pass and returns ``(loss sum, correct, layers)``; iterating
        ``layers`` runs backward, one layer per item, each yielding the offset from which
        ``grad`` is then final (so its exchange can start while the layers below are still
        computed: the kernels release the GIL).
        """
        sizes = np.asarray(self.sizes, np.int64)
        act = ACTIVATIONS[self.activation]
        acts, pre, delta, out, dZ = mlp.output_and_delta(params, sizes, act, X)
        loss_sum, correct = HEADS[self._loss_kind()](out, y, scale, dZ, True)

        def layers(delta=delta, spare=np.empty_like(delta)):
            for layer, tensor in zip(range(len(self.sizes) - 2, -1, -1), self.layout.tensors[-2::-2]):
                mlp.backward_layer(params, sizes, act, X, acts, pre, delta, spare, grad, layer)
                delta, spare = spare, delta
                yield tensor.offset

        return loss_sum, correct, layers()

    def loss(self, params, X, y):
        """``loss_grad``'s ``(loss sum, correct)`` from the forward pass alone (no gradient)."""
        return LOSS[self._loss_kind()](params, np.asarray(self.sizes, np.int64),
                                       ACTIVATIONS[self.activation], X, y)

    def predict(self, params, X):
        """Raw outputs (logits or regression values) for the rows of ``X``."""
        return mlp.predict(params, np.asarray(self.sizes, np.int64), ACTIVATIONS[self.activation], X)

    def predict_labels(self, outputs):
        """Class labels from raw outputs (classification only)."""
        if self.binary:
            return (outputs[:, 0] > 0).astype(np.int32)
        return outputs.argmax(axis=1).astype(np.int32)


def build(kind, hidden, activation, n_features, task, n_outputs, options=None):
    """The model a job asks for, sized for its dataset.

    ``softmax`` is softmax regression (classification), ``logistic`` logistic regression
    (two classes, one output logit), ``linear`` linear regression, ``mlp`` a network with
    ``hidden`` layers for either task; ``package.module:factory`` a model of the user's own
    (``granger_mpi.model.custom``), built with ``options``.
    """
    if custom.is_custom(kind):
        return custom.build(kind, options or {}, n_features=n_features, n_outputs=n_outputs, task=task)
    if kind in ("softmax", "logistic") and task != "classification":
        raise ValueError(f"model kind '{kind}' needs a classification dataset")
    if kind == "logistic" and n_outputs != 2:
        raise ValueError(f"model kind 'logistic' is binary; the dataset has {n_outputs} classes "
                         f"(use kind = 'softmax')")
    if kind == "linear" and task != "regression":
        raise ValueError("model kind 'linear' needs a regression dataset")
    if kind != "mlp" and hidden:
        raise ValueError(f"model kind '{kind}' has no hidden layers; use kind = 'mlp'")
    if kind == "mlp" and not hidden:
        raise ValueError("model kind 'mlp' needs at least one hidden layer size in 'hidden'")
    return Model(kind, (n_features, *hidden, 1 if kind == "logistic" else n_outputs), activation, task)


def from_spec(spec):
    """The model a file's ``spec()`` describes (``KeyError``, ``TypeError`` or ``ValueError``
    if it describes none; ``UserError`` if a custom model's module cannot be loaded)."""
    if custom.is_custom(spec["kind"]):
        return custom.build(spec["kind"], spec["options"], n_features=spec["n_features"],
                            n_outputs=spec["n_outputs"], task=spec["task"])
    return Model(spec["kind"], tuple(spec["sizes"]), spec["activation"], spec["task"])


def _micro_batch_bounds(n, micro_batches):
    pieces = max(1, min(micro_batches, n))
    return [n * i // pieces for i in range(pieces + 1)]


def loss_grad_in_micro_batches(model, params, X, y, scale, grad, micro_batches, scratch):
    """``model.loss_grad`` over the rows in ``micro_batches`` consecutive pieces, summed.

    Gradient accumulation: each piece's gradient goes into ``scratch`` (same size as
    ``grad``) and is added into ``grad``, so the activations of only one piece are alive
    at a time. Same result as one call up to the order of the sums; deterministic.
    """
    return _accumulate(model, params, X, y, scale, grad, scratch,
                       _micro_batch_bounds(X.shape[0], micro_batches))


def _accumulate(model, params, X, y, scale, grad, scratch, bounds):
    loss_sum, correct = model.loss_grad(params, X[:bounds[1]], y[:bounds[1]], scale, grad)
    for lo, hi in zip(bounds[1:-1], bounds[2:]):
        piece_loss, piece_correct = model.loss_grad(params, X[lo:hi], y[lo:hi], scale, scratch)
        grad += scratch
        loss_sum += piece_loss
        correct += piece_correct
    return loss_sum, correct


def loss_grad_by_layer_in_micro_batches(model, params, X, y, scale, grad, micro_batches, scratch):
    """``loss_grad_in_micro_batches`` with the last piece's backward layer by layer, bitwise
    the same: ``(loss sum, correct, layers)`` as ``Model.loss_grad_by_layer`` returns them
    (the offsets say where the summed ``grad`` is final)."""
    bounds = _micro_batch_bounds(X.shape[0], micro_batches)
    last = bounds[-2]
    if last == 0:
        return model.loss_grad_by_layer(params, X, y, scale, grad)
    loss_sum, correct = _accumulate(model, params, X, y, scale, grad, scratch, bounds[:-1])
    piece_loss, piece_correct, layers = model.loss_grad_by_layer(params, X[last:], y[last:], scale, scratch)

    def summed(top=grad.size):
        for offset in layers:
            grad[offset:top] += scratch[offset:top]
            top = offset
            yield offset

    return loss_sum + piece_loss, correct + piece_correct, summed()
