"""Plain-numpy reference implementations, written independently of the Numba kernels."""

import numpy as np
from scipy.special import erf


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


ACTIVATION = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh,
              "gelu": lambda z: 0.5 * z * (1 + erf(z / np.sqrt(2)))}
DERIVATIVE = {"relu": lambda z: (z > 0).astype(z.dtype), "tanh": lambda z: 1 - np.tanh(z) ** 2,
              "gelu": lambda z: 0.5 * (1 + erf(z / np.sqrt(2))) + z * np.exp(-z * z / 2) / np.sqrt(2 * np.pi)}


def forward(params, sizes, activation, X, with_pre=False):
    """Every layer's output; hidden layers activated (and the pre-activations if asked)."""
    outs, pres, A = [], [], X
    layers = unflatten(params, sizes)
    for i, (W, b) in enumerate(layers):
        Z = A @ W + b
        A = ACTIVATION[activation](Z) if i < len(layers) - 1 else Z
        outs.append(A)
        pres.append(Z)
    return (outs, pres) if with_pre else outs


def loss(params, sizes, activation, X, y, task):
    """Summed loss over the rows: softmax or binary cross-entropy, or half squared error."""
    out = forward(params, sizes, activation, X)[-1]
    if task == "classification":
        shifted = out - out.max(axis=1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return -logp[np.arange(len(y)), y].sum()
    if task == "binary":
        z = out[:, 0]
        return (np.logaddexp(0, z) - y * z).sum()
    return 0.5 * ((out - y) ** 2).sum()


def loss_grad(params, sizes, activation, X, y, task, scale):
    """``(summed loss, scale * summed gradient)`` by textbook back-propagation."""
    outs, pres = forward(params, sizes, activation, X, with_pre=True)
    out = outs[-1]
    if task == "classification":
        shifted = out - out.max(axis=1, keepdims=True)
        p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
        delta = p.copy()
        delta[np.arange(len(y)), y] -= 1
    elif task == "binary":
        delta = (1 / (1 + np.exp(-out[:, 0])) - y)[:, None]
    else:
        delta = out - y
    delta = delta * scale
    layers = unflatten(params, sizes)
    grads = []
    for i in range(len(layers) - 1, -1, -1):
        A_prev = X if i == 0 else outs[i - 1]
        grads.append((A_prev.T @ delta, delta.sum(axis=0)))
        if i > 0:
            delta = (delta @ layers[i][0].T) * DERIVATIVE[activation](pres[i - 1])
    flat = np.concatenate([np.concatenate([gW.ravel(), gb]) for gW, gb in reversed(grads)])
    return loss(params, sizes, activation, X, y, task), flat


def sgd_momentum(params, grad, velocity, lr, momentum, weight_decay, nesterov=False):
    """PyTorch's SGD step (``torch.optim.SGD`` with dampening 0), on copies."""
    g = grad + weight_decay * params
    velocity = momentum * velocity + g
    update = g + momentum * velocity if nesterov else velocity
    return params - lr * update, velocity


def adam(params, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    """PyTorch's Adam (L2 in the gradient) or AdamW (decoupled decay) step, on copies."""
    if decoupled:
        params = params * (1 - lr * weight_decay)
        g = grad
    else:
        g = grad + weight_decay * params
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    m_hat = m / (1 - beta1 ** step)
    v_hat = v / (1 - beta2 ** step)
    return params - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def bf16_round(x):
    """float32 ``x`` rounded to bfloat16 (nearest, ties to even), as float32; NaN excepted."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).astype(np.uint32).view(np.float32)


def ring_bf16_allreduce(inputs):
    """What the bf16 ring leaves on every rank, from every rank's float32 input: segment
    ``s`` (of ``P`` near-equal ones) is summed along ranks ``s+1, s+2, ..., s+P`` (mod P),
    each adding its float32 value to the bf16 rounding of the partial sum it received; the
    finished sum is rounded once more. One rank sends nothing and rounds nothing."""
    size, n = len(inputs), inputs[0].size
    if size == 1:
        return inputs[0].copy()
    out = np.empty(n, np.float32)
    for s in range(size):
        lo, hi = n * s // size, n * (s + 1) // size
        acc = inputs[(s + 1) % size][lo:hi].copy()
        for k in range(2, size + 1):
            acc = inputs[(s + k) % size][lo:hi] + bf16_round(acc)
        out[lo:hi] = bf16_round(acc)
    return out
