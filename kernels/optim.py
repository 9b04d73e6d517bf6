"""Optimizer updates on the flat parameter buffer, in place."""

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def sgd_momentum(params, grad, velocity, lr, momentum, weight_decay):
    """One SGD step with heavy-ball momentum and L2 weight decay (PyTorch's convention).

    ``g = grad + weight_decay * params; velocity = momentum * velocity + g;
    params -= lr * velocity``. With ``momentum = 0`` this is plain SGD.
    """
    for i in range(params.shape[0]):
        g = grad[i] + weight_decay * params[i]
        v = momentum * velocity[i] + g
        velocity[i] = v
        params[i] -= lr * v


@njit(cache=True, nogil=True)
def sum_of_squares(x):
    """``sum(x**2)`` accumulated in float64 (the squared global norm of a gradient)."""
    total = 0.0
    for i in range(x.shape[0]):
        v = np.float64(x[i])
        total += v * v
    return total
