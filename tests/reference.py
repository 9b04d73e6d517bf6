"""Plain-numpy reference implementations, written independently of the Numba kernels."""

import numpy as np


def unflatten(params, sizes):
    """``[(W, b), ...]`` from a flat buffer laid out W1, b1, W2, b2, ..."""
    layers, off = [], 0
    for d_in, d_out in zip(sizes[:-1], sizes[1:]):
        W = params[off:off + d_in * d_out].reshape(d_in, d_out)
        off += d_in * d_out
        b = params[off:off + d_out]
        off += d_out
        layers.append((W, b))
    return layers


def forward(params, sizes, activation, X):
    """Every layer's output; hidden layers activated."""
    act = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh}[activation]
    outs, A = [], X
    layers = unflatten(params, sizes)
    for i, (W, b) in enumerate(layers):
        Z = A @ W + b
        A = act(Z) if i < len(layers) - 1 else Z
        outs.append(A)
    return outs


def loss(params, sizes, activation, X, y, task):
    """Summed loss over the rows: softmax cross-entropy or half squared error."""
    out = forward(params, sizes, activation, X)[-1]
    if task == "classification":
        shifted = out - out.max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return -logp[np.arange(len(y)), y].sum()
    return 0.5 * ((out - y) ** 2).sum()


def loss_grad(params, sizes, activation, X, y, task, scale):
    """``(summed loss, scale * summed gradient)`` by textbook back-propagation."""
    outs = forward(params, sizes, activation, X)
    out = outs[-1]
    if task == "classification":
        shifted = out - out.max(axis=1, keepdims=True)
        p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        delta = p.copy()
        delta[np.arange(len(y)), y] -= 1
    else:
        delta = out - y
    delta = delta * scale
    layers = unflatten(params, sizes)
    grads = []
    for i in range(len(layers) - 1, -1, -1):
        A_prev = X if i == 0 else outs[i - 1]
        grads.append((A_prev.T @ delta, delta.sum(axis=0)))
        if i > 0:
            dA = delta @ layers[i][0].T
            delta = dA * ((A_prev > 0) if activation == "relu" else (1 - A_prev ** 2))
    flat = np.concatenate([np.concatenate([gW.ravel(), gb]) for gW, gb in reversed(grads)])
    return loss(params, sizes, activation, X, y, task), flat


def sgd_momentum(params, grad, velocity, lr, momentum, weight_decay):
    """PyTorch's SGD step, on copies."""
    g = grad + weight_decay * params
    velocity = momentum * velocity + g
    return params - lr * velocity, velocity
