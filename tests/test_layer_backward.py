"""BatchNormalization.backward and .gradients (spec R15) against PyTorch autograd
(float64) and float64 finite differences written here."""

from __future__ import annotations

import pickle

import cbn
import numpy as np
import pytest
from reference import numeric_grad

EPS = 1e-3


def check_against_finite_differences(layer, forward, x, r, gamma):
    """layer.backward(r) and its dγ, dβ against central differences of L = Σ r·forward(x, γ)
    (a float64 NumPy forward written in the test); channels last."""
    dx = layer.backward(r)
    np.testing.assert_allclose(dx, numeric_grad(lambda v: (r * forward(v)).sum(), x),
                               rtol=1e-6, atol=1e-8)
    dgamma, dbeta = layer.gradients
    for c in range(gamma.size):
        e = np.zeros(gamma.size)
        e[c] = 1e-6
        fd = ((r * forward(x, gamma + e)).sum() - (r * forward(x, gamma - e)).sum()) / 2e-6
        assert dgamma[c] == pytest.approx(fd, rel=1e-6)
    np.testing.assert_allclose(dbeta, r.reshape(-1, gamma.size).sum(0), rtol=1e-12)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_against_torch_batchnorm2d(training, layout):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    x_nchw = rng.normal(2.0, 1.5, (5, 4, 6, 3))
    dy_nchw = rng.normal(0.0, 1.0, x_nchw.shape)
    gamma, beta = rng.normal(1.0, 0.2, 4), rng.normal(0.0, 0.2, 4)
    moving_mean, moving_var = rng.normal(0.0, 1.0, 4), rng.uniform(0.5, 2.0, 4)

    module = torch.nn.BatchNorm2d(4, eps=EPS, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(torch.tensor(gamma))
        module.bias.copy_(torch.tensor(beta))
        module.running_mean.copy_(torch.tensor(moving_mean))
        module.running_var.copy_(torch.tensor(moving_var))
    module.train(training)
    xt = torch.tensor(x_nchw, requires_grad=True)
    module(xt).backward(torch.tensor(dy_nchw))

    axis = 1 if layout == "NCHW" else -1
    x = x_nchw if layout == "NCHW" else x_nchw.transpose(0, 2, 3, 1)
    dy = dy_nchw if layout == "NCHW" else dy_nchw.transpose(0, 2, 3, 1)
    layer = cbn.BatchNormalization(axis=axis, epsilon=EPS, dtype="float64")
    layer.build(x.shape)
    layer.set_weights([gamma, beta, moving_mean, moving_var])
    layer(x, training=training)
    dx = layer.backward(dy)
    dx_nchw = dx if layout == "NCHW" else dx.transpose(0, 3, 1, 2)
    np.testing.assert_allclose(dx_nchw, xt.grad.numpy(), rtol=1e-9, atol=1e-12)
    dgamma, dbeta = layer.gradients
    np.testing.assert_allclose(dgamma, module.weight.grad.numpy(), rtol=1e-9)
    np.testing.assert_allclose(dbeta, module.bias.grad.numpy(), rtol=1e-9)
    assert dx.dtype == np.float64 and dgamma.dtype == np.float64


def test_masked_training_finite_differences():
    """With a mask the statistics use the masked positions; every output (masked
    ones too) depends on them (R8, R15)."""
    rng = np.random.default_rng(2)
    x = rng.normal(1.0, 2.0, (4, 5, 3))
    r = rng.normal(0.0, 1.0, x.shape)
    mask = rng.random((4, 5)) > 0.4
    mask[0, 0] = True
    gamma, beta = rng.normal(1.0, 0.2, 3), rng.normal(0.0, 0.2, 3)

    def forward(xv, g=gamma, b=beta):
        w = mask[..., None]
        n = w.sum((0, 1))
        mean = (w * xv).sum((0, 1)) / n
        var = (w * (xv - mean) ** 2).sum((0, 1)) / n
        return (xv - mean) / np.sqrt(var + EPS) * g + b

    layer = cbn.BatchNormalization(epsilon=EPS, dtype="float64")
    layer.build(x.shape)
    layer.set_weights([gamma, beta, np.zeros(3), np.ones(3)])
    layer(x, training=True, mask=mask)
    check_against_finite_differences(layer, forward, x, r, gamma)


def test_renorm_holds_r_and_d_constant():
    """R11/R15: y = (x̂·r + d)·γ + β with r, d from the pre-call renorm statistics,
    differentiated with r and d held constant."""
    rng = np.random.default_rng(3)
    x = rng.normal(0.5, 3.0, (16, 4))
    r_out = rng.normal(0.0, 1.0, x.shape)
    gamma, beta = rng.normal(1.0, 0.2, 4), rng.normal(0.0, 0.2, 4)
    clipping = {"rmax": 2.0, "rmin": 0.5, "dmax": 0.3}
    layer = cbn.BatchNormalization(renorm=True, renorm_clipping=clipping, epsilon=EPS,
                                   dtype="float64")
    layer.build(x.shape)
    layer.gamma[...] = gamma
    layer.beta[...] = beta
    # Pre-call renorm statistics: renorm_mean = 0, renorm_stddev = √1.
    mean0, s0 = x.mean(0), np.sqrt(x.var(0) + EPS)
    r0 = np.clip(s0 / 1.0, 0.5, 2.0)
    d0 = np.clip(mean0 / 1.0, -0.3, 0.3)
    assert (r0 != s0).any() and (np.abs(d0) == 0.3).any()  # clipping is active

    def forward(xv, g=gamma):
        xhat = (xv - xv.mean(0)) / np.sqrt(xv.var(0) + EPS)
        return (xhat * r0 + d0) * g + beta

    layer(x, training=True)
    dx = layer.backward(r_out)
    np.testing.assert_allclose(dx, numeric_grad(lambda v: (r_out * forward(v)).sum(), x),
                               rtol=1e-6, atol=1e-8)
    xhat = (x - mean0) / s0
    dgamma, dbeta = layer.gradients
    np.testing.assert_allclose(dgamma, (r_out * (xhat * r0 + d0)).sum(0), rtol=1e-10)
    np.testing.assert_allclose(dbeta, r_out.sum(0), rtol=1e-12)


def test_inference_call_uses_moving_statistics_as_constants():
    rng = np.random.default_rng(4)
    x = rng.normal(0.0, 1.0, (6, 2, 5))
    dy = rng.normal(0.0, 1.0, x.shape)
    layer = cbn.BatchNormalization(axis=1, epsilon=EPS, dtype="float64")
    layer.build(x.shape)
    mm, mv, gamma = np.array([0.3, -1.0]), np.array([2.0, 0.5]), np.array([1.5, -0.5])
    layer.set_weights([gamma, np.zeros(2), mm, mv])
    layer(x, training=False)
    dx = layer.backward(dy)
    s = 1 / np.sqrt(mv + EPS)
    np.testing.assert_allclose(dx, dy * (gamma * s)[None, :, None], rtol=1e-14)
    xhat = (x - mm[None, :, None]) * s[None, :, None]
    np.testing.assert_allclose(layer.gradients[0], (dy * xhat).sum((0, 2)), rtol=1e-12)


def test_gradients_align_with_trainable_weights():
    x = np.random.default_rng(5).normal(size=(8, 3)).astype(np.float32)
    dy = np.ones_like(x)
    for center, scale, expected in [(True, True, 2), (False, True, 1), (True, False, 1),
                                    (False, False, 0)]:
        layer = cbn.BatchNormalization(center=center, scale=scale)
        layer(x, training=True)
        layer.backward(dy)
        assert len(layer.gradients) == len(layer.trainable_weights) == expected
        for g, w in zip(layer.gradients, layer.trainable_weights, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype
    frozen = cbn.BatchNormalization(trainable=False)
    frozen(x, training=True)  # trainable=False: inference mode (R3.1)
    dx = frozen.backward(dy)
    assert frozen.gradients == []
    np.testing.assert_allclose(dx, dy / np.sqrt(1 + EPS), rtol=1e-6)


def test_mixed_precision_dtypes():
    """dx has the output's dtype; gradients have the weights' dtype (R15)."""
    rng = np.random.default_rng(6)
    x = rng.normal(0, 1, (32, 8)).astype(np.float32)
    dy = rng.normal(0, 1, x.shape).astype(np.float32)
    layer = cbn.BatchNormalization(dtype="mixed_float16")
    y = layer(x, training=True)
    dx = layer.backward(dy)
    assert y.dtype == dx.dtype == np.float16
    assert all(g.dtype == np.float32 for g in layer.gradients)
    x16 = x.astype(np.float16).astype(np.float64)
    xhat = (x16 - x16.mean(0)) / np.sqrt(x16.var(0) + EPS)
    dy16 = dy.astype(np.float16).astype(np.float64)
    expected = (dy16 - dy16.mean(0) - xhat * (dy16 * xhat).mean(0)) / np.sqrt(x16.var(0) + EPS)
    np.testing.assert_allclose(dx.astype(np.float64), expected, atol=2e-3 * np.abs(expected).max())


def test_errors_leave_gradients_unchanged():
    layer = cbn.BatchNormalization()
    with pytest.raises(ValueError, match="no call to differentiate"):
        layer.backward(np.zeros((2, 3)))
    x = np.random.default_rng(7).normal(size=(4, 3)).astype(np.float32)
    layer(x, training=True)
    layer.backward(np.ones_like(x))
    before = [g.copy() for g in layer.gradients]
    with pytest.raises(ValueError, match="dy has shape"):
        layer.backward(np.ones((4, 2)))
    with pytest.raises(TypeError, match="dy has dtype"):
        layer.backward(np.ones((4, 3), complex))
    for g, b in zip(layer.gradients, before, strict=True):
        np.testing.assert_array_equal(g, b)


def test_pickle_drops_the_saved_input():
    x = np.ones((4, 3), np.float32)
    layer = cbn.BatchNormalization()
    layer(x, training=True)
    clone = pickle.loads(pickle.dumps(layer))
    with pytest.raises(ValueError, match="no call to differentiate"):
        clone.backward(x)


def test_apply_constraints_after_an_sgd_step():
    layer = cbn.BatchNormalization(gamma_constraint="non_neg", beta_constraint=None)
    x = np.random.default_rng(8).normal(size=(16, 3)).astype(np.float32)
    layer(x, training=True)
    layer.backward(np.random.default_rng(9).normal(size=x.shape).astype(np.float32) * 50)
    for w, g in zip(layer.trainable_weights, layer.gradients, strict=True):
        w -= 1.0 * g
    layer.apply_constraints()
    assert (layer.gamma >= 0).all()


def test_ghost_batches_finite_differences():
    """R12 + R15: each ghost batch {b : b mod (B/V) = g} is normalized with its own
    statistics, and dx goes through them; dγ, dβ add up over the ghost batches."""
    rng = np.random.default_rng(10)
    x = rng.normal(1.0, 2.0, (8, 2, 3))
    r = rng.normal(0.0, 1.0, x.shape)
    gamma, beta = rng.normal(1.0, 0.2, 3), rng.normal(0.0, 0.2, 3)
    groups = 2  # B / V

    def forward(xv, g=gamma):
        y = np.empty_like(xv)
        for k in range(groups):
            xg = xv[k::groups]
            mean, var = xg.mean((0, 1)), xg.var((0, 1))
            y[k::groups] = (xg - mean) / np.sqrt(var + EPS) * g + beta
        return y

    layer = cbn.BatchNormalization(virtual_batch_size=4, epsilon=EPS, dtype="float64")
    layer.build(x.shape)
    layer.gamma[...] = gamma
    layer.beta[...] = beta
    layer(x, training=True)
    check_against_finite_differences(layer, forward, x, r, gamma)


def test_adjustment_with_renorm_is_constant():
    """R13 + R15: y = ((x̂·r + d)·a_scale + a_bias)·γ + β, with r, d, a_scale, a_bias
    constants for the gradient."""
    rng = np.random.default_rng(11)
    x = rng.normal(0.5, 3.0, (12, 3))
    r_out = rng.normal(0.0, 1.0, x.shape)
    a_scale, a_bias = np.array([0.5, 2.0, 1.5]), np.array([0.1, -0.2, 0.3])
    layer = cbn.BatchNormalization(renorm=True, renorm_clipping={"rmax": 1.5, "dmax": 0.2},
                                   adjustment=lambda shape: (a_scale, a_bias), epsilon=EPS,
                                   dtype="float64")
    layer.build(x.shape)
    gamma = np.array([1.2, 0.8, -0.5])
    layer.gamma[...] = gamma
    r0 = np.minimum(np.sqrt(x.var(0) + EPS), 1.5)
    d0 = np.clip(x.mean(0), -0.2, 0.2)

    def forward(xv, g=gamma):
        xhat = (xv - xv.mean(0)) / np.sqrt(xv.var(0) + EPS)
        return ((xhat * r0 + d0) * a_scale + a_bias) * g

    layer(x, training=True)
    dx = layer.backward(r_out)
    np.testing.assert_allclose(dx, numeric_grad(lambda v: (r_out * forward(v)).sum(), x),
                               rtol=1e-6, atol=1e-8)
    xhat = (x - x.mean(0)) / np.sqrt(x.var(0) + EPS)
    np.testing.assert_allclose(layer.gradients[0],
                               (r_out * ((xhat * r0 + d0) * a_scale + a_bias)).sum(0), rtol=1e-10)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("scale", [True, False])
def test_small_call_backward_equals_the_general_path(dtype, training, scale):
    """A small call's backward takes one core call (dy an ndarray of x's dtype); given dy
    as nested lists it takes the general path: the same dx and gradients, bitwise, and
    both equal to a float64 closed form written here (R15)."""
    rng = np.random.default_rng(7)
    x = rng.normal(1.0, 2.0, (6, 5)).astype(dtype)
    dy = rng.normal(0.0, 1.0, x.shape).astype(dtype)
    layer = cbn.BatchNormalization(epsilon=EPS, scale=scale, dtype=dtype)
    layer.build(x.shape)
    gamma = rng.uniform(0.5, 2.0, 5)
    layer.set_weights([gamma, rng.normal(0, 1, 5), rng.normal(0, 1, 5), rng.uniform(1, 2, 5)]
                      if scale else [rng.normal(0, 1, 5), rng.normal(0, 1, 5),
                                     rng.uniform(1, 2, 5)])
    layer(x, training=training)
    dx_fast, grads_fast = layer.backward(dy), [g.copy() for g in layer.gradients]
    dx_general, grads_general = layer.backward(dy.tolist()), layer.gradients
    np.testing.assert_array_equal(dx_fast, dx_general)
    assert dx_fast.dtype == dx_general.dtype == np.dtype(dtype)
    for fast, general in zip(grads_fast, grads_general, strict=True):
        np.testing.assert_array_equal(fast, general)
        assert fast.dtype == general.dtype

    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    g = gamma if scale else np.ones(5)
    if training:
        mean, var = x64.mean(0), x64.var(0)
    else:
        mean, var = (w.astype(np.float64) for w in layer.get_weights()[-2:])
    xhat = (x64 - mean) / np.sqrt(var + EPS)
    dxhat = dy64 * g
    expected = dxhat / np.sqrt(var + EPS)
    if training:
        expected = (dxhat - dxhat.mean(0) - xhat * (dxhat * xhat).mean(0)) / np.sqrt(var + EPS)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(dx_fast, expected, rtol=tol, atol=tol)
    np.testing.assert_allclose(grads_fast[-1], dy64.sum(0), rtol=tol, atol=tol)
    if scale:
        np.testing.assert_allclose(grads_fast[0], (dy64 * xhat).sum(0), rtol=tol, atol=tol)
