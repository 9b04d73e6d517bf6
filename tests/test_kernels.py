"""Kernels against central finite differences (float64) and the numpy reference (float32)."""

import numpy as np
import pytest

from granger_mpi.kernels import checks, mlp, optim
from granger_mpi.model import models
from granger_mpi.model.models import build, mlp_layout, Model

import reference

CASES = [  # (sizes, activation, task); "binary" is the logistic loss on one output
    ((5, 3), "relu", "classification"),            # softmax regression
    ((5, 7, 6, 3), "relu", "classification"),      # MLP, 2 hidden layers
    ((4, 6, 3), "tanh", "classification"),
    ((4, 6, 5, 4, 3), "tanh", "classification"),   # 3 hidden layers
    ((5, 7, 6, 3), "gelu", "classification"),
    ((5, 1), "relu", "binary"),                    # logistic regression
    ((4, 6, 5, 1), "gelu", "binary"),              # MLP with a logistic output
    ((5, 3), "relu", "regression"),                # linear regression
    ((4, 8, 2), "relu", "regression"),             # MLP with MSE output
    ((4, 8, 7, 2), "gelu", "regression"),
]
ACTIVATIONS = {"relu": mlp.RELU, "tanh": mlp.TANH, "gelu": mlp.GELU}
LOSSES = {"classification": mlp.cross_entropy_loss_grad, "binary": mlp.binary_cross_entropy_loss_grad,
          "regression": mlp.squared_error_loss_grad}


def problem(sizes, task, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    model = Model("mlp", sizes, "relu", task)
    params = model.init_params(seed, dtype) + rng.normal(0, 0.1, model.layout.size).astype(dtype)
    X = rng.normal(size=(n, sizes[0])).astype(dtype)
    if task == "classification":
        y = rng.integers(0, sizes[-1], n).astype(np.int32)
    elif task == "binary":
        y = rng.integers(0, 2, n).astype(np.int32)
    else:
        y = rng.normal(size=(n, sizes[-1])).astype(dtype)
    return params, X, y


def kernel(sizes, activation, task, params, X, y, scale):
    grad = np.zeros_like(params)
    loss, correct = LOSSES[task](params, np.array(sizes, np.int64), ACTIVATIONS[activation],
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
                                             X.astype(np.float64), y if task != "regression"
                                             else y.astype(np.float64), task, 1 / 64)
    np.testing.assert_allclose(grad, ref_grad, rtol=2e-4, atol=2e-6)
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    if task == "classification":
        out = reference.forward(params, sizes, activation, X)[-1]
        assert correct == int((out.argmax(axis=1) == y).sum())
    if task == "binary":
        out = reference.forward(params, sizes, activation, X)[-1]
        assert correct == int(((out[:, 0] > 0) == (y == 1)).sum())


LOSS_ONLY = {"classification": mlp.cross_entropy_loss, "binary": mlp.binary_cross_entropy_loss,
             "regression": mlp.squared_error_loss}


@pytest.mark.parametrize("sizes,activation,task", CASES)
def test_the_loss_only_pass_gives_the_loss_and_count_of_the_gradient_pass(sizes, activation, task):
    """evaluate and predict need no gradient: the forward-only kernels return the same
    (loss sum, correct) as the gradient kernels, bitwise, and the numpy reference's loss."""
    params, X, y = problem(sizes, task, 64, np.float32, seed=2)
    loss, correct, _ = kernel(sizes, activation, task, params, X, y, 1 / 64)
    only = LOSS_ONLY[task](params, np.array(sizes, np.int64), ACTIVATIONS[activation], X, y)
    assert only == (loss, correct)
    ref = reference.loss(params.astype(np.float64), sizes, activation, X.astype(np.float64),
                         y if task != "regression" else y.astype(np.float64), task)
    assert only[0] == pytest.approx(ref, rel=1e-5)


def test_l2_penalty_gradient_matches_central_differences_in_float64():
    rng = np.random.default_rng(4)
    params = rng.normal(size=40)
    grad = rng.normal(size=40)
    before = grad.copy()
    penalty = mlp.l2_penalty_grad(params, 0.3, grad)
    h = 1e-6
    numeric = np.array([(0.15 * ((params + h * e) ** 2).sum() - 0.15 * ((params - h * e) ** 2).sum()) / (2 * h)
                        for e in np.eye(40)])
    np.testing.assert_allclose(grad - before, numeric, rtol=1e-6, atol=1e-8)
    assert penalty == pytest.approx(0.15 * (params ** 2).sum(), rel=1e-12)


def test_model_loss_with_l2_penalty_matches_central_differences_in_float64():
    """The whole regularized objective of an MLP: data loss plus 0.5 * wd * ||params||^2."""
    sizes, activation, task, wd = (4, 6, 3), "gelu", "classification", 0.05
    params, X, y = problem(sizes, task, 7, np.float64, seed=5)
    loss, _, grad = kernel(sizes, activation, task, params, X, y, 1.0)
    loss += mlp.l2_penalty_grad(params, wd, grad)

    def objective(p):
        return reference.loss(p, sizes, activation, X, y, task) + 0.5 * wd * (p ** 2).sum()
    h = 1e-6
    numeric = np.array([(objective(params + h * e) - objective(params - h * e)) / (2 * h)
                        for e in np.eye(params.size)])
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-7)
    assert loss == pytest.approx(objective(params), rel=1e-12)


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


@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_variants_match_numpy_step_by_step(momentum, nesterov):
    rng = np.random.default_rng(6)
    params = rng.normal(size=50).astype(np.float32)
    velocity = np.zeros_like(params)
    ref_params, ref_velocity = params.astype(np.float64), velocity.astype(np.float64)
    for _ in range(10):
        grad = rng.normal(size=50).astype(np.float32)
        optim.sgd_momentum(params, grad, velocity, np.float32(0.05), np.float32(momentum),
                           np.float32(1e-2), nesterov)
        ref_params, ref_velocity = reference.sgd_momentum(ref_params, grad, ref_velocity, 0.05, momentum,
                                                          1e-2, nesterov)
        np.testing.assert_allclose(params, ref_params, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(velocity, ref_velocity, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_adam_and_adamw_match_numpy_step_by_step(decoupled):
    rng = np.random.default_rng(7)
    params = rng.normal(size=50).astype(np.float32)
    m, v = np.zeros_like(params), np.zeros_like(params)
    ref = (params.astype(np.float64), m.astype(np.float64), v.astype(np.float64))
    for step in range(1, 21):
        grad = rng.normal(size=50).astype(np.float32) * np.float32(10 ** rng.uniform(-3, 1))
        optim.adam(params, grad, m, v, 1e-2, 0.9, 0.999, 1e-8, 0.05, step, decoupled)
        ref = reference.adam(*ref[:1], grad, *ref[1:], 1e-2, 0.9, 0.999, 1e-8, 0.05, step, decoupled)
        for got, want in zip((params, m, v), ref):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)


def test_fused_weight_decay_is_the_l2_penalty_gradient():
    """``weight_decay`` inside the SGD kernel is exactly the gradient of the L2 penalty."""
    rng = np.random.default_rng(8)
    params = rng.normal(size=64).astype(np.float32)
    grad = rng.normal(size=64).astype(np.float32)
    fused, fused_v = params.copy(), np.zeros_like(params)
    optim.sgd_momentum(fused, grad, fused_v, np.float32(0.1), np.float32(0.9), np.float32(0.01))
    separate, separate_v, g = params.copy(), np.zeros_like(params), grad.copy()
    mlp.l2_penalty_grad(separate, np.float32(0.01), g)
    optim.sgd_momentum(separate, g, separate_v, np.float32(0.1), np.float32(0.9), np.float32(0))
    assert np.array_equal(fused, separate) and np.array_equal(fused_v, separate_v)


def test_clipping_kernels():
    x = np.array([3.0, -4.0, 0.5, -0.25], np.float32)
    assert optim.clip_by_value(x, np.float32(1.0)) == 2
    assert x.tolist() == [1.0, -1.0, 0.5, -0.25]
    optim.scale(x, np.float32(0.5))
    assert x.tolist() == [0.5, -0.5, 0.25, -0.125]


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
    assert build("logistic", (), "relu", 4, "classification", 2).sizes == (4, 1)
    with pytest.raises(ValueError, match="binary"):
        build("logistic", (), "relu", 4, "classification", 3)


@pytest.mark.parametrize("activation", ["relu", "tanh", "gelu"])
def test_one_layer_forward_and_backward_match_numpy(activation):
    rng = np.random.default_rng(3)
    n, d_in, d_out = 11, 6, 4
    A_in, W, b = (rng.normal(size=s) for s in ((n, d_in), (d_in, d_out), (d_out,)))
    Z, pre = np.empty((n, d_out)), np.empty((n, d_out))
    mlp.layer_forward(A_in, W, b, True, ACTIVATIONS[activation], Z, pre)
    np.testing.assert_allclose(Z, reference.ACTIVATION[activation](A_in @ W + b), rtol=1e-12)
    Z_out = np.empty((n, d_out))
    mlp.layer_forward(A_in, W, b, False, ACTIVATIONS[activation], Z_out, pre[:0])
    np.testing.assert_allclose(Z_out, A_in @ W + b, rtol=1e-12)   # the output layer: no activation

    # Backward through this layer when the layer below ended in ``activation``.
    pre_in = rng.normal(size=(n, d_in))
    A_below = reference.ACTIVATION[activation](pre_in)
    dZ = rng.normal(size=(n, d_out))
    gW, gb, dA = np.empty((d_in, d_out)), np.empty(d_out), np.empty((n, d_in))
    mlp.layer_backward(A_below, W, dZ, gW, gb, ACTIVATIONS[activation], pre_in, dA)
    np.testing.assert_allclose(gW, A_below.T @ dZ, rtol=1e-12)
    np.testing.assert_allclose(gb, dZ.sum(axis=0), rtol=1e-12)
    np.testing.assert_allclose(dA, (dZ @ W.T) * reference.DERIVATIVE[activation](pre_in), rtol=1e-12)
    untouched = np.full((0, d_in), 7.0)
    mlp.layer_backward(A_below, W, dZ, gW, gb, ACTIVATIONS[activation], pre_in[:0], untouched)
    np.testing.assert_allclose(gW, A_below.T @ dZ, rtol=1e-12)     # the first layer: no delta below


@pytest.mark.parametrize("sizes,activation,task", CASES)
def test_layer_by_layer_gradient_is_bitwise_the_whole_network_kernel(sizes, activation, task):
    params, X, y = problem(sizes, task, 37, np.float32, seed=2)
    model = Model("logistic" if task == "binary" else "mlp", sizes, activation,
                  "classification" if task == "binary" else task)
    whole = np.zeros_like(params)
    expected = model.loss_grad(params, X, y, np.float32(1 / 37), whole)
    layered = np.full_like(params, np.nan)
    loss, correct, layers = model.loss_grad_by_layer(params, X, y, np.float32(1 / 37), layered)
    assert (loss, correct) == expected
    offsets = []
    for offset in layers:       # everything from offset on is final already
        assert not np.isnan(layered[offset:]).any()
        offsets.append(offset)
    assert layered.tobytes() == whole.tobytes()
    assert offsets == [t.offset for t in model.layout.tensors[-2::-2]] and offsets[-1] == 0


@pytest.mark.parametrize("rows,pieces", [(100, 7), (37, 3), (5, 1), (2, 4)])
def test_micro_batches_by_layer_are_bitwise_the_accumulated_kernel(rows, pieces):
    sizes = (5, 7, 6, 3)
    params, X, y = problem(sizes, "classification", rows, np.float32, seed=4)
    model = Model("mlp", sizes, "tanh", "classification")
    scale = np.float32(1 / rows)
    whole, scratch = np.zeros_like(params), np.empty_like(params)
    expected = models.loss_grad_in_micro_batches(model, params, X, y, scale, whole, pieces, scratch)
    layered = np.full_like(params, np.nan)
    loss, correct, layers = models.loss_grad_by_layer_in_micro_batches(
        model, params, X, y, scale, layered, pieces, np.empty_like(params))
    assert (loss, correct) == expected
    for offset in layers:
        assert not np.isnan(layered[offset:]).any()
    assert layered.tobytes() == whole.tobytes()
