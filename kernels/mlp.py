"""Multilayer perceptron loss and gradient on one flat parameter buffer.

Layer sizes ``sizes = [d_in, h_1, ..., h_k, d_out]`` describe the network; with no hidden
layer it is softmax regression (cross-entropy), logistic regression (one output, binary
cross-entropy) or linear regression (MSE). Hidden layers use ReLU, tanh or GELU (exact, with
erf, as PyTorch's default). The flat buffer
holds, layer after layer, ``W_l`` (row-major, ``sizes[l] x sizes[l+1]``) then ``b_l``;
``granger_mpi.model.models.mlp_layout`` names the same views.

Every kernel is pure: inputs are arrays and scalars, the gradient is written into a buffer
the caller owns, and nothing else is touched. ``nogil`` lets the data prefetch thread and
the exchange of finished gradients run while a rank computes.

The per-layer API is ``layer_forward`` and ``layer_backward`` (one dense layer on matrices)
and ``backward_layer`` (the same on the flat buffers, one call per layer, last first), so a
caller can act between layers; the whole-network kernels (``*_loss_grad``) are the same
calls composed, and give bitwise the same results.
"""

import math

import numpy as np
from numba import njit

RELU = 0
TANH = 1
GELU = 2
INV_SQRT2 = 1.0 / math.sqrt(2.0)
INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


@njit(cache=True, nogil=True)
def layer_offsets(sizes):
    """Offsets of every ``W_l`` and ``b_l`` in the flat buffer, and the buffer's length."""
    n_layers = sizes.shape[0] - 1
    w_off = np.empty(n_layers, np.int64)
    b_off = np.empty(n_layers, np.int64)
    off = 0
    for layer in range(n_layers):
        w_off[layer] = off
        off += sizes[layer] * sizes[layer + 1]
        b_off[layer] = off
        off += sizes[layer + 1]
    return w_off, b_off, off


@njit(cache=True, nogil=True)
def layer_forward(A_in, W, b, hidden, activation, Z, pre):
    """One dense layer: ``Z = act(A_in @ W + b)``, ``act`` the identity unless ``hidden``.

    GELU's derivative needs the pre-activation, which then goes into ``pre`` (shaped like
    ``Z``); ReLU's and tanh's follow from the output, and ``pre`` may be empty.
    """
    np.dot(A_in, W, Z)
    n, d_out = Z.shape
    for i in range(n):
        for j in range(d_out):
            v = Z[i, j] + b[j]
            if hidden:
                if activation == RELU:
                    v = max(v, 0.0)
                elif activation == TANH:
                    v = np.tanh(v)
                else:
                    pre[i, j] = v
                    v = 0.5 * v * (1.0 + math.erf(v * INV_SQRT2))
            Z[i, j] = v


@njit(cache=True, nogil=True)
def layer_backward(A_in, W, dZ, gW, gb, activation, pre_in, dA_in):
    """Back through one dense layer, given ``dZ = d loss / d Z`` (already scaled).

    Writes the layer's gradient, ``gW = A_in^T dZ`` and ``gb = sum_i dZ_i``; then, unless
    ``dA_in`` is empty (the first layer), the delta of the layer below, ``dA_in =
    (dZ W^T) * act'``, where ``act'`` follows from that layer's output ``A_in`` (or its
    pre-activation ``pre_in``, GELU).
    """
    np.dot(A_in.T, dZ, gW)
    n, d_out = dZ.shape
    for j in range(d_out):
        gb[j] = 0.0
    for i in range(n):
        for j in range(d_out):
            gb[j] += dZ[i, j]
    if dA_in.shape[0] == 0:
        return
    np.dot(dZ, W.T, dA_in)
    d_in = dA_in.shape[1]
    for i in range(n):
        for j in range(d_in):
            a = A_in[i, j]
            if activation == RELU:
                if a <= 0.0:
                    dA_in[i, j] = 0.0
            elif activation == TANH:
                dA_in[i, j] *= 1.0 - a * a
            else:   # d/dz z Phi(z) = Phi(z) + z phi(z)
                z = pre_in[i, j]
                dA_in[i, j] *= (0.5 * (1.0 + math.erf(z * INV_SQRT2))
                                + z * INV_SQRT2PI * math.exp(-0.5 * z * z))


@njit(cache=True, nogil=True)
def _view(flat, off, rows, cols):
    """``flat[off:off + rows * cols]`` as a ``rows x cols`` matrix (empty if ``flat`` is)."""
    if flat.shape[0] == 0:
        return flat.reshape(0, cols)
    return flat[off:off + rows * cols].reshape(rows, cols)


@njit(cache=True, nogil=True)
def _forward(params, sizes, activation, X, acts, pre):
    """Fill ``acts`` with every layer's output (hidden layers activated, last one raw) and,
    for GELU, ``pre`` (laid out like ``acts``) with the pre-activations; returns the output."""
    n = X.shape[0]
    n_layers = sizes.shape[0] - 1
    w_off, b_off, _ = layer_offsets(sizes)
    a_off = 0
    A_prev = X
    for layer in range(n_layers):
        d_in = sizes[layer]
        d_out = sizes[layer + 1]
        W = params[w_off[layer]:w_off[layer] + d_in * d_out].reshape(d_in, d_out)
        Z = acts[a_off:a_off + n * d_out].reshape(n, d_out)
        layer_forward(A_prev, W, params[b_off[layer]:b_off[layer] + d_out],
                      layer < n_layers - 1, activation, Z, _view(pre, a_off, n, d_out))
        A_prev = Z
        a_off += n * d_out
    return A_prev


@njit(cache=True, nogil=True)
def backward_layer(params, sizes, activation, X, acts, pre, delta, spare, grad, layer):
    """``layer_backward`` of layer ``layer`` on the flat buffers: reads its delta from
    ``delta``, writes its gradient into ``grad`` and the delta of the layer below into
    ``spare`` (which the next call, one layer down, reads as its ``delta``)."""
    n = X.shape[0]
    w_off, b_off, _ = layer_offsets(sizes)
    d_in = sizes[layer]
    d_out = sizes[layer + 1]
    if layer == 0:
        A_in = X
        pre_in = pre[:0].reshape(0, d_in)
        dA_in = spare[:0].reshape(0, d_in)
    else:
        a_in = activation_offsets(sizes, n)[layer - 1]
        A_in = acts[a_in:a_in + n * d_in].reshape(n, d_in)
        pre_in = _view(pre, a_in, n, d_in)
        dA_in = spare[:n * d_in].reshape(n, d_in)
    layer_backward(A_in, params[w_off[layer]:w_off[layer] + d_in * d_out].reshape(d_in, d_out),
                   delta[:n * d_out].reshape(n, d_out),
                   grad[w_off[layer]:w_off[layer] + d_in * d_out].reshape(d_in, d_out),
                   grad[b_off[layer]:b_off[layer] + d_out], activation, pre_in, dA_in)


@njit(cache=True, nogil=True)
def _backward(params, sizes, activation, X, acts, pre, delta, grad):
    """Back-propagate ``delta`` (d loss / d output, already scaled) into ``grad``."""
    spare = np.empty_like(delta)
    for layer in range(sizes.shape[0] - 2, -1, -1):
        backward_layer(params, sizes, activation, X, acts, pre, delta, spare, grad, layer)
        delta, spare = spare, delta


@njit(cache=True, nogil=True)
def activation_offsets(sizes, n):
    """Start of each layer's output inside the activations workspace of ``n`` rows."""
    n_layers = sizes.shape[0] - 1
    start = np.empty(n_layers, np.int64)
    off = 0
    for layer in range(n_layers):
        start[layer] = off
        off += n * sizes[layer + 1]
    return start


@njit(cache=True, nogil=True)
def _workspaces(params, sizes, activation, n):
    """Activations, pre-activations (GELU only, else empty) and the delta workspace."""
    total = 0
    widest = 0
    for layer in range(1, sizes.shape[0]):
        total += n * sizes[layer]
        widest = max(widest, n * max(sizes[layer], sizes[layer - 1]))
    pre = np.empty(total if activation == GELU else 0, params.dtype)
    return np.empty(total, params.dtype), pre, np.empty(widest, params.dtype)


@njit(cache=True, nogil=True)
def output_and_delta(params, sizes, activation, X):
    """Forward pass; returns the workspaces, the output and its delta view."""
    n = X.shape[0]
    acts, pre, delta = _workspaces(params, sizes, activation, n)
    out = _forward(params, sizes, activation, X, acts, pre)
    return acts, pre, delta, out, delta[:n * out.shape[1]].reshape(n, out.shape[1])


@njit(cache=True, nogil=True)
def softmax_cross_entropy(out, labels, scale, dZ, want_grad):
    """``(sum_i loss_i, correct rows)`` of softmax cross-entropy on the logits ``out``; with
    ``want_grad``, ``dZ = scale * d loss / d out``."""
    n, n_out = out.shape
    loss = 0.0
    correct = 0
    for i in range(n):
        peak = out[i, 0]
        best = 0
        for j in range(1, n_out):
            if out[i, j] > peak:
                peak = out[i, j]
                best = j
        total = 0.0
        for j in range(n_out):
            e = np.exp(out[i, j] - peak)
            if want_grad:
                dZ[i, j] = e
            total += e
        label = labels[i]
        loss += np.log(total) - (out[i, label] - peak)
        if best == label:
            correct += 1
        if want_grad:
            for j in range(n_out):
                dZ[i, j] = dZ[i, j] / total * scale
            dZ[i, label] -= scale
    return loss, correct


@njit(cache=True, nogil=True)
def half_squared_error(out, targets, scale, dZ, want_grad):
    """``(sum_i 0.5 ||out_i - t_i||^2, 0)``; with ``want_grad``, ``dZ = scale * (out - t)``."""
    n, n_out = out.shape
    loss = 0.0
    for i in range(n):
        for j in range(n_out):
            diff = out[i, j] - targets[i, j]
            loss += 0.5 * diff * diff
            if want_grad:
                dZ[i, j] = diff * scale
    return loss, 0


@njit(cache=True, nogil=True)
def logistic(out, labels, scale, dZ, want_grad):
    """``(sum_i log(1 + e^z) - y z, rows where (z > 0) equals the label)`` on one logit
    ``z`` per row; with ``want_grad``, ``dZ = scale * (sigmoid(z) - y)``."""
    loss = 0.0
    correct = 0
    for i in range(out.shape[0]):
        z = out[i, 0]
        y = labels[i]
        # Stable for large |z|: log(1 + e^z) = max(z, 0) + log1p(e^-|z|).
        loss += max(z, 0.0) - z * y + np.log1p(np.exp(-abs(z)))
        if (z > 0.0) == (y == 1):
            correct += 1
        if want_grad:
            if z >= 0.0:
                p = 1.0 / (1.0 + np.exp(-z))
            else:
                e = np.exp(z)
                p = e / (1.0 + e)
            dZ[i, 0] = (p - y) * scale
    return loss, correct


@njit(cache=True, nogil=True)
def cross_entropy_loss_grad(params, sizes, activation, X, labels, scale, grad):
    """Softmax cross-entropy over the rows of ``X``.

    Writes ``scale * sum_i d loss_i / d params`` into ``grad`` and returns
    ``(sum_i loss_i, number of rows whose argmax equals the label)``. ``scale`` is
    ``1 / global batch`` so that summing the ranks' gradients gives the batch mean.
    """
    acts, pre, delta, out, dZ = output_and_delta(params, sizes, activation, X)
    loss, correct = softmax_cross_entropy(out, labels, scale, dZ, True)
    _backward(params, sizes, activation, X, acts, pre, delta, grad)
    return loss, correct


@njit(cache=True, nogil=True)
def squared_error_loss_grad(params, sizes, activation, X, targets, scale, grad):
    """Half squared error ``0.5 * ||f(x_i) - t_i||^2`` over the rows of ``X``.

    Writes ``scale * sum_i d loss_i / d params`` into ``grad``; returns ``(sum_i loss_i, 0)``.
    """
    acts, pre, delta, out, dZ = output_and_delta(params, sizes, activation, X)
    loss, correct = half_squared_error(out, targets, scale, dZ, True)
    _backward(params, sizes, activation, X, acts, pre, delta, grad)
    return loss, correct


@njit(cache=True, nogil=True)
def binary_cross_entropy_loss_grad(params, sizes, activation, X, labels, scale, grad):
    """Logistic loss on one output logit ``z``: ``log(1 + e^z) - y z`` with labels 0/1.

    The network has one output (``sizes[-1] == 1``); with no hidden layer this is logistic
    regression. Writes ``scale * sum_i d loss_i / d params`` into ``grad``; returns
    ``(sum_i loss_i, rows where (z > 0) equals the label)``.
    """
    acts, pre, delta, out, dZ = output_and_delta(params, sizes, activation, X)
    loss, correct = logistic(out, labels, scale, dZ, True)
    _backward(params, sizes, activation, X, acts, pre, delta, grad)
    return loss, correct


@njit(cache=True, nogil=True)
def cross_entropy_loss(params, sizes, activation, X, labels):
    """``cross_entropy_loss_grad``'s ``(loss sum, correct)`` from the forward pass alone."""
    out = predict(params, sizes, activation, X)
    return softmax_cross_entropy(out, labels, 0.0, out, False)


@njit(cache=True, nogil=True)
def squared_error_loss(params, sizes, activation, X, targets):
    """``squared_error_loss_grad``'s ``(loss sum, 0)`` from the forward pass alone."""
    out = predict(params, sizes, activation, X)
    return half_squared_error(out, targets, 0.0, out, False)


@njit(cache=True, nogil=True)
def binary_cross_entropy_loss(params, sizes, activation, X, labels):
    """``binary_cross_entropy_loss_grad``'s ``(loss sum, correct)`` from the forward pass alone."""
    out = predict(params, sizes, activation, X)
    return logistic(out, labels, 0.0, out, False)


@njit(cache=True, nogil=True)
def l2_penalty_grad(params, weight_decay, grad):
    """L2 weight decay: adds ``weight_decay * params`` to ``grad``; returns ``0.5 * weight_decay * ||params||^2``.

    The optimizer kernels fuse this same term (``g = grad + weight_decay * params``) into
    their update; this separate form is for reporting the penalty and for tests.
    """
    total = 0.0
    for i in range(params.shape[0]):
        p = params[i]
        grad[i] += weight_decay * p
        total += np.float64(p) * np.float64(p)
    return 0.5 * weight_decay * total


@njit(cache=True, nogil=True)
def predict(params, sizes, activation, X):
    """The network's raw outputs (logits or regression values) for the rows of ``X``."""
    acts, pre, _ = _workspaces(params, sizes, activation, X.shape[0])
    return _forward(params, sizes, activation, X, acts, pre).copy()
