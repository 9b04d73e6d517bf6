"""Optimizer updates and gradient transforms on the flat parameter buffer, in place.

Every update follows PyTorch's definition of the same optimizer (``torch.optim.SGD``,
``Adam``, ``AdamW``), so hyper-parameters mean what users expect. They work on any
contiguous slice as well as on the whole buffer (a sharded optimizer updates its shard).
"""

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def sgd_momentum(params, grad, velocity, lr, momentum, weight_decay, nesterov=False):
    """One SGD step with heavy-ball or Nesterov momentum and L2 weight decay.

    ``g = grad + weight_decay * params; velocity = momentum * velocity + g``; then
    ``params -= lr * velocity``, or with ``nesterov`` ``params -= lr * (g + momentum *
    velocity)``. With ``momentum = 0`` this is plain SGD.
    """
    for i in range(params.shape[0]):
        g = grad[i] + weight_decay * params[i]
        v = momentum * velocity[i] + g
        velocity[i] = v
        if nesterov:
            params[i] -= lr * (g + momentum * v)
        else:
            params[i] -= lr * v


@njit(cache=True, nogil=True)
def adam(params, grad, m, v, lr, beta1, beta2, eps, weight_decay, step, decoupled):
    """One Adam step (``decoupled=False``: L2 in the gradient) or AdamW step (decoupled decay).

    ``step`` is this update's number, from 1 (bias correction). Arithmetic in float64,
    state stored in the buffers' type.
    """
    bias1 = 1.0 - beta1 ** step
    bias2_sqrt = np.sqrt(1.0 - beta2 ** step)
    step_size = lr / bias1
    shrink = 1.0 - lr * weight_decay
    for i in range(params.shape[0]):
        p = np.float64(params[i])
        g = np.float64(grad[i])
        if decoupled:
            p *= shrink
        else:
            g += weight_decay * p
        mi = beta1 * m[i] + (1.0 - beta1) * g
        vi = beta2 * v[i] + (1.0 - beta2) * g * g
        m[i] = mi
        v[i] = vi
        params[i] = p - step_size * mi / (np.sqrt(vi) / bias2_sqrt + eps)


@njit(cache=True, nogil=True)
def scale(x, factor):
    """``x *= factor`` (gradient clipping by norm once the factor is known)."""
    for i in range(x.shape[0]):
        x[i] *= factor


@njit(cache=True, nogil=True)
def clip_by_value(x, limit):
    """Clamp every element into ``[-limit, limit]``; returns how many were clamped."""
    clipped = 0
    for i in range(x.shape[0]):
        if x[i] > limit:
            x[i] = limit
            clipped += 1
        elif x[i] < -limit:
            x[i] = -limit
            clipped += 1
    return clipped


@njit(cache=True, nogil=True)
def sum_of_squares(x):
    """``sum(x**2)`` accumulated in float64 (the squared global norm of a gradient)."""
    total = 0.0
    for i in range(x.shape[0]):
        v = np.float64(x[i])
        total += v * v
    return total
