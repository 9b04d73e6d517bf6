"""Kernels against central finite differences (float64) and the numpy reference (float32)."""

import numpy as np
import pytest

from granger_mpi.kernels import checks, mlp, optim
from granger_mpi.models import Model, build, mlp_layout

import reference

CASES = [  # (sizes, activation, task)
    ((5, 3), "relu", "classification"),            # softmax regression
    ((5, 7, 6, 3), "relu", "classification"),      # MLP, 2 hidden layers
    ((4, 6, 3), "tanh", "classification"),
    ((5, 3), "relu", "regression"),                # linear regression
    ((4, 8, 2), "relu", "regression"),             # MLP with MSE output
]


def problem(sizes, task, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    model = Model("mlp", sizes, "relu", task)
    params = model.init_params(seed, dtype) + rng.normal(0, 0.1, model.layout.size).astype(dtype)
    X = rng.normal(size=(n, sizes[0])).astype(dtype)
    if task == "classification":
        y = rng.integers(0, sizes[-1], n).astype(np.int32)
    else:
        y = rng.normal(size=(n, sizes[-1])).astype(dtype)
    return params, X, y


def kernel(sizes, activation, task, params, X, y, scale):
    grad = np.zeros_like(params)
    fn = mlp.cross_entropy_loss_grad if task == "classification" else mlp.squared_error_loss_grad
    loss, correct = fn(params, np.array(sizes, np.int64), {"relu": mlp.RELU, "tanh": mlp.TANH}[activation],
                       X, y, params.dtype.type(scale), grad)
    return loss, correct, grad


@pytest.mark.parametrize("sizes,activation,task", CASES)
def test_gradient_matches_central_differences_in_float64(sizes, activation, task):
    params, X, y = problem(sizes, task, 9, np.float64)
    loss, _, grad = kernel(sizes, activation, task, params, X, y, 1.0)
    h = 1e-6
    numeric = np.empty_like(params)
    for i in range(params.size):
        up, down = params.copy(), params.copy()
        up[i] += h
        down[i] -= h
        numeric[i] = (reference.loss(up, sizes, activation, X, y, task)
                      - reference.loss(down, sizes, activation, X, y, task)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)
    assert loss == pytest.approx(reference.loss(params, sizes, activation, X, y, task), rel=1e-12)


@pytest.mark.parametrize("sizes,activation,task", CASES)
def test_float32_kernel_matches_numpy_reference(sizes, activation, task):
    params, X, y = problem(sizes, task, 64, np.float32, seed=1)
    loss, correct, grad = kernel(sizes, activation, task, params, X, y, 1 / 64)
    ref_loss, ref_grad = reference.loss_grad(params.astype(np.float64), sizes, activation,
                                             X.astype(np.float64), y if task == "classification"
                                             else y.astype(np.float64), task, 1 / 64)
    np.testing.assert_allclose(grad, ref_grad, rtol=2e-4, atol=2e-6)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    if task == "classification":
        out = reference.forward(params, sizes, activation, X)[-1]
        assert correct == int((out.argmax(axis=1) == y).sum())


def test_layout_names_match_kernel_offsets():
    sizes = np.array([5, 7, 6, 3], np.int64)
    w_off, b_off, total = mlp.layer_offsets(sizes)
    layout = mlp_layout(tuple(sizes))
    by_name = {t.name: t for t in layout.tensors}
    assert layout.size == total
    for layer in range(3):
        assert by_name[f"W{layer + 1}"].offset == w_off[layer]
        assert by_name[f"b{layer + 1}"].offset == b_off[layer]


def test_gradient_of_split_batch_sums_to_whole_batch():
    """What data parallelism relies on: per-rank gradients scaled by 1/B add up to the mean."""
    sizes = (6, 8, 4)
    params, X, y = problem(sizes, "classification", 30, np.float64, seed=2)
    _, _, whole = kernel(sizes, "relu", "classification", params, X, y, 1 / 30)
    parts = sum(kernel(sizes, "relu", "classification", params, X[a:b], y[a:b], 1 / 30)[2]
                for a, b in ((0, 11), (11, 20), (20, 30)))
    np.testing.assert_allclose(parts, whole, rtol=1e-12, atol=1e-15)


def test_sgd_momentum_matches_numpy_step_by_step():
    rng = np.random.default_rng(3)
    params = rng.normal(size=50).astype(np.float32)
    velocity = np.zeros_like(params)
    ref_params, ref_velocity = params.astype(np.float64), velocity.astype(np.float64)
    for _ in range(10):
        grad = rng.normal(size=50).astype(np.float32)
        optim.sgd_momentum(params, grad, velocity, np.float32(0.05), np.float32(0.9), np.float32(1e-3))
        ref_params, ref_velocity = reference.sgd_momentum(ref_params, grad, ref_velocity, 0.05, 0.9, 1e-3)
        np.testing.assert_allclose(params, ref_params, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(velocity, ref_velocity, rtol=1e-5, atol=1e-6)


def test_sum_of_squares_is_float64_accurate():
    x = np.full(10**6, 0.1, np.float32)
    assert optim.sum_of_squares(x) == pytest.approx(10**6 * float(np.float32(0.1)) ** 2, rel=1e-10)


def test_bad_rows_are_found():
    X = np.zeros((5, 3), np.float32)
    labels = np.zeros(5, np.int32)
    assert checks.first_bad_row_classification(X, labels, 4) == -1
    labels[3] = 4
    assert checks.first_bad_row_classification(X, labels, 4) == 3
    labels[3] = 0
    X[2, 1] = np.nan
    assert checks.first_bad_row_classification(X, labels, 4) == 2
    targets = np.zeros((5, 2), np.float32)
    targets[1, 1] = np.inf
    assert checks.first_bad_row_regression(np.zeros((5, 3), np.float32), targets) == 1


def test_build_rejects_mismatched_kind_and_task():
    with pytest.raises(ValueError, match="classification"):
        build("softmax", (), "relu", 4, "regression", 1)
    with pytest.raises(ValueError, match="hidden"):
        build("mlp", (), "relu", 4, "classification", 3)
    assert build("mlp", (8,), "relu", 4, "classification", 3).sizes == (4, 8, 3)
