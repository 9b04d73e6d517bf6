"""Input checks run on every batch before a kernel trusts it."""

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def first_bad_row_classification(X, labels, n_classes):
    """Index of the first row with a NaN/Inf feature or a label outside [0, n_classes), else -1."""
    for i in range(X.shape[0]):
        if labels[i] < 0 or labels[i] >= n_classes:
            return i
        for j in range(X.shape[1]):
            if not np.isfinite(X[i, j]):
                return i
    return -1


@njit(cache=True, nogil=True)
def first_bad_row_regression(X, targets):
    """Index of the first row with a NaN/Inf feature or target, else -1."""
    for i in range(X.shape[0]):
        for j in range(X.shape[1]):
            if not np.isfinite(X[i, j]):
                return i
        for j in range(targets.shape[1]):
            if not np.isfinite(targets[i, j]):
                return i
    return -1
