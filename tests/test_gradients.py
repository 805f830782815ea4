"""Finite-difference checks of every layer and of stacks of layers, in float64."""

import numpy as np
import pytest

from dbmpi.model import build
from dbmpi.model import ops_reference as O

SM = {"type": "softmax", "classes": 3}


def fd_check(spec, batch, seed, n_check=40, tol=2e-5):
    net = build(spec, backend="reference")
    rng = np.random.default_rng(seed)
    theta = net.init_params(seed).astype(np.float64)
    theta += rng.standard_normal(theta.shape) * 0.05  # nonzero biases, no ties at relu kinks
    c, h, w = net.input_shape
    x = rng.standard_normal((batch, c, h, w))
    y = rng.integers(0, net.classes, batch)
    _, g = net.loss_and_grad(theta, x, y)
    assert g.dtype == np.float64 and g.shape == theta.shape
    idx = rng.choice(len(theta), min(n_check, len(theta)), replace=False)
    eps = 1e-6
    for i in idx:
        e = np.zeros_like(theta)
        e[i] = eps
        fd = (net.loss_and_grad(theta + e, x, y)[0] - net.loss_and_grad(theta - e, x, y)[0]) / (2 * eps)
        assert abs(fd - g[i]) <= tol * max(1.0, abs(fd)), (i, fd, g[i])


LAYERS = [
    ({"type": "locally_connected", "channels": 3, "kernel": 3, "activation": "relu"}, (2, 7, 6)),
    ({"type": "locally_connected", "channels": 2, "kernel": 3, "stride": 2, "padding": 1,
      "activation": "tanh"}, (1, 9, 7)),
    ({"type": "locally_connected", "channels": 4, "kernel": 5, "stride": 3,
      "activation": "sigmoid"}, (3, 11, 5)),
    ({"type": "locally_connected", "channels": 2, "kernel": 4, "activation": "linear"}, (1, 4, 4)),
    ({"type": "fully_connected", "units": 7, "activation": "sigmoid"}, (2, 3, 5)),
    ({"type": "fully_connected", "units": 5, "activation": "relu"}, (1, 1, 9)),
    ({"type": "max_pool", "size": 2}, (2, 7, 5)),
    ({"type": "max_pool", "size": 3, "stride": 2}, (1, 9, 8)),
    ({"type": "l2_pool", "size": 2, "stride": 1}, (2, 5, 6)),
    ({"type": "lcn", "size": 3}, (3, 6, 7)),
    ({"type": "lcn", "size": 5}, (1, 5, 5)),
]


@pytest.mark.parametrize("layer,shape", LAYERS, ids=lambda v: str(v))
@pytest.mark.parametrize("batch", [1, 3])
def test_layer_then_softmax(layer, shape, batch):
    # a trainable layer below makes the gradient flow through `layer`'s input gradient
    below = {"type": "locally_connected", "channels": shape[0], "kernel": 1, "activation": "linear"}
    fd_check({"input_shape": list(shape), "layers": [below, layer, SM]}, batch, seed=batch)


@pytest.mark.parametrize("seed", range(3))
def test_deep_stack_with_l2(seed):
    spec = {"input_shape": [2, 11, 9], "l2": 1e-2, "layers": [
        {"type": "lcn", "size": 3},
        {"type": "locally_connected", "channels": 3, "kernel": 3, "stride": 2, "padding": 1},
        {"type": "l2_pool", "size": 2, "stride": 1},
        {"type": "locally_connected", "channels": 2, "kernel": 2, "activation": "tanh"},
        {"type": "max_pool", "size": 2},
        {"type": "fully_connected", "units": 6, "activation": "sigmoid"},
        {"type": "softmax", "classes": 4}]}
    fd_check(spec, batch=1 + seed, seed=seed)


def test_softmax_only_is_logistic_regression():
    spec = {"input_shape": [1, 3, 3], "l2": 0.1, "layers": [{"type": "softmax", "classes": 5}]}
    fd_check(spec, batch=4, seed=0)


@pytest.mark.parametrize("kind", ["max", "l2"])
def test_pool_input_gradient_directly(kind):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 7, 6, 3))
    y, aux = O.pool_forward(x, 3, 2, kind)
    dy = rng.standard_normal(y.shape)
    dx = O.pool_backward(x, dy, aux, 3, 2, kind)
    for _ in range(20):
        i = tuple(rng.integers(0, s) for s in x.shape)
        e = np.zeros_like(x)
        e[i] = 1e-6
        fd = ((O.pool_forward(x + e, 3, 2, kind)[0] - O.pool_forward(x - e, 3, 2, kind)[0]) * dy).sum() / 2e-6
        assert abs(fd - dx[i]) < 1e-5


def test_lc_input_gradient_directly():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 6, 5, 2))
    w = rng.standard_normal((3, 3, 3 * 3 * 2, 4))
    b = rng.standard_normal((3, 3, 4))
    y = O.lc_forward(x, w, b, 3, 2, 1, "tanh")
    dy = rng.standard_normal(y.shape)
    dw, db = np.empty_like(w), np.empty_like(b)
    dx = O.lc_backward(x, w, y, dy, 3, 2, 1, "tanh", dw, db, True)
    for _ in range(20):
        i = tuple(rng.integers(0, s) for s in x.shape)
        e = np.zeros_like(x)
        e[i] = 1e-6
        fd = ((O.lc_forward(x + e, w, b, 3, 2, 1, "tanh") - O.lc_forward(x - e, w, b, 3, 2, 1, "tanh")) * dy).sum() / 2e-6
        assert abs(fd - dx[i]) < 1e-5


def test_bad_shapes_raise_naming_the_layer():
    with pytest.raises(ValueError, match=r"model.layers\[0\] \(locally_connected\).*height=4"):
        build({"input_shape": [1, 4, 4], "layers": [
            {"type": "locally_connected", "channels": 2, "kernel": 5}, SM]})
    with pytest.raises(ValueError, match=r"model.layers\[1\] \(max_pool\)"):
        build({"input_shape": [1, 4, 4], "layers": [
            {"type": "locally_connected", "channels": 2, "kernel": 3},
            {"type": "max_pool", "size": 3}, SM]})
    net = build({"input_shape": [1, 4, 4], "layers": [SM]})
    with pytest.raises(ValueError, match="input_shape"):
        net.loss_and_grad(net.init_params(0), np.zeros((2, 1, 4, 5), np.float32), [0, 1])


def test_api_shapes_and_dtypes():
    net = build({"input_shape": [1, 8, 8], "l2": 1e-3, "layers": [
        {"type": "locally_connected", "channels": 4, "kernel": 3},
        {"type": "softmax", "classes": 10}]})
    theta = net.init_params(7)
    assert theta.dtype == np.float32 and theta.shape == (net.num_params,)
    assert np.array_equal(theta, net.init_params(7))
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    loss, grad = net.loss_and_grad(theta, x, np.arange(5))
    assert isinstance(loss, float) and grad.dtype == np.float32 and grad.shape == theta.shape
    labels = net.predict(theta, x)
    assert labels.shape == (5,) and labels.dtype.kind == "i"


FUSED = {"input_shape": [2, 9, 8], "layers": [
    {"type": "locally_connected", "channels": 2, "kernel": 1, "activation": "linear"},
    {"type": "locally_connected", "channels": 8, "kernel": 3, "padding": 1},   # microkernel
    {"type": "max_pool", "size": 2},
    {"type": "locally_connected", "channels": 3, "kernel": 2, "activation": "tanh"},  # BLAS
    {"type": "fully_connected", "units": 6, "activation": "sigmoid"},
    {"type": "softmax", "classes": 4}]}


@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("l2", [0.0, 0.05])
def test_sgd_step_fused_into_backward(backend, l2):
    """out=theta, scale=-lr, accumulate=True is exactly loss_and_grad then theta -= lr*g:
    every layer takes its input gradient before its weights change (l2 as a decay)."""
    net = build(dict(FUSED, l2=l2), backend=backend)
    rng = np.random.default_rng(3)
    theta = net.init_params(2) + (rng.standard_normal(net.num_params) * 0.1).astype(np.float32)
    x = rng.standard_normal((6, 2, 9, 8)).astype(np.float32)
    y = rng.integers(0, 4, 6)
    loss, g = net.loss_and_grad(theta, x, y)
    lr = 0.7
    stepped = theta.copy()
    loss_f, out = net.loss_and_grad(stepped, x, y, out=stepped, scale=-lr, accumulate=True)
    assert out is stepped and loss_f == loss
    np.testing.assert_allclose(stepped, theta - lr * g, rtol=1e-5, atol=1e-6)
    acc = np.ones_like(theta)                    # accumulate into a separate array
    net.loss_and_grad(theta, x, y, out=acc, scale=2.0, accumulate=True)
    np.testing.assert_allclose(acc, 1 + 2 * g, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="accumulate=True adds to out"):
        net.loss_and_grad(theta, x, y, accumulate=True)
    with pytest.raises(ValueError, match="overlaps theta"):
        big = np.concatenate([theta, theta])
        net.loss_and_grad(big[:net.num_params], x, y, out=big[1:net.num_params + 1],
                          accumulate=True)


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_relu_below_l2_pool_skips_its_mask_exactly(backend):
    """A relu layer under an L2 pool skips relu's backward (the pool's gradient is already 0
    where relu gave 0): the gradient equals the one with the mask applied, bit for bit."""
    spec = {"input_shape": [2, 10, 10], "layers": [
        {"type": "locally_connected", "channels": 8, "kernel": 3, "activation": "relu"},
        {"type": "l2_pool", "size": 2},
        {"type": "locally_connected", "channels": 3, "kernel": 2, "activation": "relu"},
        {"type": "max_pool", "size": 2},
        {"type": "softmax", "classes": 4}]}
    net = build(spec, backend=backend)
    assert [getattr(layer, "back_act", None) for layer in net.layers] == \
        ["linear", None, "relu", None, "linear"]
    rng = np.random.default_rng(5)
    theta = net.init_params(1)
    x = rng.standard_normal((5, 2, 10, 10)).astype(np.float32)
    y = rng.integers(0, 4, 5)
    loss, g = net.loss_and_grad(theta, x, y)
    net.layers[0].back_act = "relu"
    loss2, g2 = net.loss_and_grad(theta, x, y)
    assert loss == loss2
    np.testing.assert_array_equal(g, g2)
    fd_check(spec, 3, seed=2)                       # and it is the true gradient
