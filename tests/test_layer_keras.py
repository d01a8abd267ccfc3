"""Behaviour of cbn.BatchNormalization: Keras' BatchNormalization behaviours re-expressed, plus the
numeric rules of behaviour.md (R2-R7; masks, R8, in test_layer_masks.py). Every expected value
comes from tests/reference.py (float64 NumPy), a closed form, or numbers derived by hand."""

from __future__ import annotations

import cbn
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_state import F32_TOL, NAMES4, rng, set_state, weights_dict
from reference import moments, normalize, snapshot, train_step

BN = cbn.BatchNormalization


# ---------------------------------------------------------------- Keras: momentum 0, chained calls


def test_momentum0_chained_layers_give_zero_mean_unit_std_R5_1_R6():
    # Keras "correctness" test re-expressed: data N(5, 10); with momentum 0 the moving statistics
    # equal the batch statistics, and two chained layers give mean 0 / std 1 per channel.
    x = rng().normal(5.0, 10.0, (256, 6)).astype(np.float32)
    l1, l2 = BN(momentum=0.0), BN(momentum=0.0)
    y1 = np.asarray(l1(x, training=True))
    y2 = np.asarray(l2(y1, training=True))
    mu, var = moments(x)
    np.testing.assert_allclose(np.asarray(l1.moving_mean, np.float64), mu, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(l1.moving_variance, np.float64), var, rtol=1e-6)
    mu1, var1 = moments(y1)
    np.testing.assert_allclose(np.asarray(l2.moving_mean, np.float64), mu1, atol=1e-6)
    np.testing.assert_allclose(np.asarray(l2.moving_variance, np.float64), var1, rtol=1e-6)
    y2 = y2.astype(np.float64)
    np.testing.assert_allclose(y2.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(y2.std(axis=0), 1.0, atol=2e-3)
    # Inference right after: moving stats == batch stats, so the inference output equals the
    # training output (R3, R6).
    np.testing.assert_allclose(np.asarray(l1(x), np.float64), normalize(x, mu, var), **F32_TOL)


def test_momentum0_inference_on_training_data_is_standardized_R5_1():
    # Keras: after fitting with momentum, (predict - beta) / gamma has mean 0, std 1.
    x = rng(3).normal(-7.0, 4.0, (500, 3)).astype(np.float32)
    layer = BN(momentum=0.0, epsilon=1e-6)
    layer.build(x.shape)
    layer.set_weights([np.float32([2.0, 0.5, 3.0]), np.float32([1.0, -1.0, 0.0]),
                       np.zeros(3, np.float32), np.ones(3, np.float32)])
    layer(x, training=True)
    y = np.asarray(layer(x, training=False), np.float64)
    z = (y - np.array([1.0, -1.0, 0.0])) / np.array([2.0, 0.5, 3.0])
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=0), 1.0, atol=1e-5)


# ---------------------------------------------------------------- R3 training vs inference


def test_training_uses_batch_stats_and_inference_uses_moving_stats_R3_1_R6():
    x = rng(1).normal(2.0, 3.0, (32, 4)).astype(np.float32)
    layer = BN(momentum=0.8)
    st0 = set_state(layer, x.shape)
    y_train = np.asarray(layer(x, training=True))
    y_ref, st1, mu, var = train_step(x, st0, momentum=0.8)
    np.testing.assert_allclose(y_train.astype(np.float64), y_ref, **F32_TOL)
    got = weights_dict(layer)
    np.testing.assert_allclose(got["moving_mean"], st1["moving_mean"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["moving_variance"], st1["moving_variance"], rtol=1e-6)
    # inference uses the (updated) moving statistics and leaves them alone
    before = snapshot(layer)
    y_inf = np.asarray(layer(x, training=False))
    y_inf_ref = normalize(x, got["moving_mean"], got["moving_variance"], got["gamma"], got["beta"])
    np.testing.assert_allclose(y_inf.astype(np.float64), y_inf_ref, **F32_TOL)
    for a, b in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_training_default_is_inference_R3_1():
    x = rng(2).normal(1.0, 2.0, (16, 3)).astype(np.float32)
    layer = BN(momentum=0.5)
    st0 = set_state(layer, x.shape)
    before = snapshot(layer)
    y = np.asarray(layer(x))
    ref = normalize(x, st0["moving_mean"], st0["moving_variance"], st0["gamma"], st0["beta"])
    np.testing.assert_allclose(y.astype(np.float64), ref, **F32_TOL)
    for a, b in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("flag", [1, np.bool_(True)])
def test_truthy_training_means_training_R3_1(flag):
    # R3.1: bool(training) decides.
    x = rng(4).normal(3.0, 2.0, (16, 2)).astype(np.float32)
    layer = BN(momentum=0.0)
    y = np.asarray(layer(x, training=flag), np.float64)
    mu, var = moments(x)
    np.testing.assert_allclose(y, normalize(x, mu, var), **F32_TOL)
    np.testing.assert_allclose(np.asarray(layer.moving_mean, np.float64), mu, rtol=1e-6)


@pytest.mark.parametrize("flag", [0, False, np.bool_(False), None])
def test_falsy_training_means_inference_R3_1(flag):
    x = rng(4).normal(3.0, 2.0, (16, 2)).astype(np.float32)
    layer = BN(momentum=0.0)
    y = np.asarray(layer(x, training=flag), np.float64)
    np.testing.assert_allclose(y, x / np.sqrt(1.0 + 1e-3), **F32_TOL)
    np.testing.assert_array_equal(layer.moving_mean, np.zeros(2, np.float32))
    np.testing.assert_array_equal(layer.moving_variance, np.ones(2, np.float32))


def test_trainable_false_forces_inference_R3_1():
    # Keras "trainable" test: a frozen BN layer runs in inference mode even with training=True.
    x = rng(5).normal(4.0, 3.0, (20, 3)).astype(np.float32)
    layer = BN(momentum=0.5)
    st0 = set_state(layer, x.shape)
    layer.trainable = False
    before = snapshot(layer)
    y = np.asarray(layer(x, training=True), np.float64)
    ref = normalize(x, st0["moving_mean"], st0["moving_variance"], st0["gamma"], st0["beta"])
    np.testing.assert_allclose(y, ref, **F32_TOL)
    for a, b in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)
    # and un-freezing restores training behaviour
    layer.trainable = True
    y = np.asarray(layer(x, training=True), np.float64)
    y_ref, *_ = train_step(x, st0, momentum=0.5)
    np.testing.assert_allclose(y, y_ref, **F32_TOL)


def test_trainable_constructor_arg_false_forces_inference_R3_1():
    x = rng(6).normal(4.0, 3.0, (20, 3)).astype(np.float32)
    layer = BN(trainable=False)
    y = np.asarray(layer(x, training=True), np.float64)
    np.testing.assert_allclose(y, x / np.sqrt(1.0 + 1e-3), **F32_TOL)
    np.testing.assert_array_equal(layer.moving_mean, np.zeros(3, np.float32))


def _vals(ws):
    return [np.asarray(w) for w in ws]


def test_trainable_toggle_moves_weights_and_drops_losses_R3_2():
    layer = BN(gamma_regularizer="l2", beta_regularizer="l1")
    layer.build((4, 3))
    gamma, beta = np.float32([1.0, 2.0, 3.0]), np.float32([-1.0, 0.5, 0.0])
    mm, mv = np.float32([0.1, 0.2, 0.3]), np.float32([4.0, 5.0, 6.0])
    layer.set_weights([gamma, beta, mm, mv])
    expected_all = [gamma, beta, mm, mv]

    def check(ws, exp):
        ws = _vals(ws)
        assert len(ws) == len(exp)
        for w, e in zip(ws, exp, strict=True):
            np.testing.assert_array_equal(w, e)

    check(layer.weights, expected_all)
    check(layer.trainable_weights, [gamma, beta])
    check(layer.non_trainable_weights, [mm, mv])
    assert len(layer.losses) == 2

    layer.trainable = False
    assert layer.trainable is False
    check(layer.trainable_weights, [])
    check(layer.non_trainable_weights, expected_all)
    check(layer.weights, expected_all)
    assert list(layer.losses) == []

    layer.trainable = True
    check(layer.trainable_weights, [gamma, beta])
    check(layer.non_trainable_weights, [mm, mv])
    losses = [float(v) for v in layer.losses]
    assert losses == pytest.approx([0.01 * (1 + 4 + 9), 0.01 * 1.5], rel=1e-6)


# ---------------------------------------------------------------- R2 weights


@pytest.mark.parametrize(
    "kwargs, shape, names, wshape",
    [
        ({}, (2, 5), NAMES4, (5,)),
        ({"axis": 1}, (2, 3, 4, 4), NAMES4, (3,)),
        ({"axis": -3}, (2, 3, 4, 4), NAMES4, (3,)),
        ({"axis": [1, 3]}, (2, 3, 4, 5), NAMES4, (3, 5)),
        ({"axis": (3, 1)}, (2, 3, 4, 5), NAMES4, (3, 5)),
        ({"axis": [-1, 1]}, (2, 3, 4, 5), NAMES4, (3, 5)),
        ({"center": False}, (2, 5), ["gamma", "moving_mean", "moving_variance"], (5,)),
        ({"scale": False}, (2, 5), ["beta", "moving_mean", "moving_variance"], (5,)),
        ({"center": False, "scale": False}, (2, 5), ["moving_mean", "moving_variance"], (5,)),
        ({"renorm": True}, (2, 5), NAMES4 + ["moving_stddev", "renorm_mean", "renorm_stddev"],
         (5,)),
    ],
)
def test_weight_order_shapes_and_attributes_R2_2(kwargs, shape, names, wshape):
    layer = BN(**kwargs)
    all_names = NAMES4 + ["moving_stddev", "renorm_mean", "renorm_stddev"]
    for n in all_names:
        assert getattr(layer, n, None) is None  # None before build
    layer.build(shape)
    # distinct values so order is observable
    new = [np.full(wshape, i + 1.0, np.float32) for i in range(len(names))]
    layer.set_weights(new)
    ws = layer.get_weights()
    assert len(ws) == len(names) == len(layer.weights)
    for i, (n, w, lw) in enumerate(zip(names, ws, layer.weights, strict=True)):
        assert np.asarray(w).shape == wshape
        np.testing.assert_array_equal(w, i + 1.0)
        np.testing.assert_array_equal(np.asarray(lw), i + 1.0)
        attr = getattr(layer, n)
        assert isinstance(attr, np.ndarray) and attr.dtype == np.float32
        np.testing.assert_array_equal(attr, i + 1.0)
    for n in set(all_names) - set(names):
        assert getattr(layer, n, None) is None


def test_initial_weight_values_R1_2_R2_2():
    layer = BN()
    layer.build((3, 4))
    expected = [np.ones(4), np.zeros(4), np.zeros(4), np.ones(4)]
    for w, e in zip(layer.get_weights(), expected, strict=True):
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, e)


def test_set_weights_accepts_tf_keras2_broadcast_shapes_R2_2():
    x = rng(7).normal(1.0, 2.0, (2, 3, 4, 5)).astype(np.float32)
    layer = BN(axis=[1, 3], momentum=0.0)
    layer.build(x.shape)
    r = rng(8)
    vals = [r.uniform(0.5, 2, (3, 5)), r.uniform(-1, 1, (3, 5)), r.uniform(-1, 1, (3, 5)),
            r.uniform(0.5, 2, (3, 5))]
    vals = [v.astype(np.float32) for v in vals]
    layer.set_weights([v.reshape(1, 3, 1, 5) for v in vals])
    for w, v in zip(layer.get_weights(), vals, strict=True):
        assert w.shape == (3, 5)
        np.testing.assert_array_equal(w, v)
    y = np.asarray(layer(x), np.float64)
    ref = normalize(x, vals[2], vals[3], vals[0], vals[1], axis=[1, 3])
    np.testing.assert_allclose(y, ref, **F32_TOL)
    # single axis stored as (1, 1, 1, C)
    l2 = BN()
    l2.build((2, 3, 4, 5))
    l2.set_weights([np.full((1, 1, 1, 5), 2.0, np.float32)] * 4)
    for w in l2.get_weights():
        assert w.shape == (5,)
        np.testing.assert_array_equal(w, 2.0)


def test_batch_and_other_axes_may_change_R2_3():
    layer = BN(axis=1, momentum=0.0)
    for i, shape in enumerate([(4, 3, 5), (1, 3, 2), (9, 3, 7)]):
        x = rng(10 + i).normal(0.0, 1.0, shape).astype(np.float32)
        y = np.asarray(layer(x, training=True), np.float64)
        assert y.shape == shape
        mu, var = moments(x, 1)
        np.testing.assert_allclose(y, normalize(x, mu, var, axis=1), **F32_TOL)


@pytest.mark.parametrize("shape", [(None, 4), (2, 3, 4), (7, 1, 1, 4)])
def test_compute_output_shape_returns_input_shape_R2_4(shape):
    assert tuple(BN().compute_output_shape(shape)) == tuple(shape)


# ---------------------------------------------------------------- R4 batch statistics


def test_variance_is_biased_R4_1():
    x = np.float32([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [6.0, 60.0]])
    layer = BN(momentum=0.0)
    layer(x, training=True)
    # mean (3, 30); biased variance: (4+1+0+9)/4 = 3.5 and 350 (unbiased would be 14/3 and 466.7)
    np.testing.assert_allclose(layer.moving_mean, [3.0, 30.0], rtol=1e-7)
    np.testing.assert_allclose(layer.moving_variance, [3.5, 350.0], rtol=1e-7)


@pytest.mark.parametrize("shape, axis", [((1, 4), -1), ((1, 3, 1, 1), 1), ((1, 2, 3), [1, 2])])
def test_single_sample_gives_exactly_beta_R4_1(shape, axis):
    x = rng(11).normal(5.0, 3.0, shape).astype(np.float32)
    layer = BN(axis=axis, momentum=0.75)
    layer.build(shape)
    cs = tuple(shape[a] for a in sorted(np.atleast_1d(axis) % len(shape)))
    beta = np.arange(1, int(np.prod(cs)) + 1, dtype=np.float32).reshape(cs) * 0.25
    gamma = np.full(cs, 3.0, np.float32)
    mv = np.full(cs, 2.0, np.float32)
    layer.set_weights([gamma, beta, np.zeros(cs, np.float32), mv])
    y = np.asarray(layer(x, training=True))
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, beta.reshape(shape))
    # sigma^2 = 0: moving variance just decays, moving mean moves toward x
    np.testing.assert_allclose(layer.moving_variance, 2.0 * 0.75, rtol=1e-7)
    np.testing.assert_allclose(layer.moving_mean, x.reshape(cs) * 0.25, rtol=1e-6)


def _ulp_bound(yref):
    return 4 * 2.0**-23 * np.abs(yref).max()


@pytest.mark.parametrize("offset", [1e4, 1e5])
@pytest.mark.parametrize("shape, axis", [((8192, 4), -1), ((8, 4, 1024), 1)])
def test_large_mean_accuracy_training_R4_2(offset, shape, axis):
    r = rng(12)
    x = (offset + r.normal(0.0, 1.0, shape)).astype(np.float32)
    layer = BN(axis=axis, momentum=0.0)
    y = np.asarray(layer(x, training=True))
    assert np.isfinite(y).all()
    mu, var = moments(x, axis)
    mv = np.asarray(layer.moving_variance, np.float64)
    assert (mv >= 0).all()
    np.testing.assert_allclose(mv, var, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(layer.moving_mean, np.float64), mu, rtol=1e-7)
    yref = normalize(x, mu, var, axis=axis)
    assert np.abs(y.astype(np.float64) - yref).max() <= _ulp_bound(yref)


@pytest.mark.parametrize("offset", [1e4, 1e5])
def test_large_mean_accuracy_inference_R4_2(offset):
    r = rng(13)
    x = (offset + r.normal(0.0, 1.0, (4096, 3))).astype(np.float32)
    layer = BN(momentum=0.0)
    layer(x, training=True)
    w = weights_dict(layer)
    y = np.asarray(layer(x, training=False))
    yref = normalize(x, w["moving_mean"], w["moving_variance"], w["gamma"], w["beta"])
    assert np.abs(y.astype(np.float64) - yref).max() <= _ulp_bound(yref)


def test_constant_large_input_has_zero_variance_and_no_nan_R4_2():
    x = np.full((1000, 3), 1e5, np.float32)
    x[:, 1] = 12345.678
    layer = BN(momentum=0.0)
    layer.build(x.shape)
    beta = np.float32([0.5, -2.0, 7.0])
    layer.set_weights([np.ones(3, np.float32), beta, np.zeros(3, np.float32),
                       np.ones(3, np.float32)])
    y = np.asarray(layer(x, training=True))
    assert np.isfinite(y).all()
    mv = np.asarray(layer.moving_variance)
    assert (mv >= 0).all() and (mv <= 1e-6).all()
    np.testing.assert_allclose(y, np.broadcast_to(beta, x.shape), atol=1e-3)


# ---------------------------------------------------------------- R5 moving statistics


def test_moving_update_formula_over_steps_no_bias_correction_R5_1():
    layer = BN(momentum=0.9)
    st0 = set_state(layer, (10, 3), seed=20)
    state = st0
    for step in range(5):
        x = rng(30 + step).normal(step - 2.0, 1.0 + step, (10, 3)).astype(np.float32)
        layer(x, training=True)
        _, state, mu, var = train_step(x, state, momentum=0.9)
        got = weights_dict(layer)
        np.testing.assert_allclose(got["moving_mean"], state["moving_mean"], rtol=1e-6,
                                   atol=1e-6)
        np.testing.assert_allclose(got["moving_variance"], state["moving_variance"], rtol=1e-6)
        if step == 0:
            # no bias correction: first update is 0.9 * initial + 0.1 * batch
            np.testing.assert_allclose(got["moving_mean"], 0.9 * st0["moving_mean"] + 0.1 * mu,
                                       rtol=1e-6, atol=1e-7)
    # gamma/beta untouched by forward calls
    np.testing.assert_array_equal(weights_dict(layer)["gamma"], st0["gamma"])
    np.testing.assert_array_equal(weights_dict(layer)["beta"], st0["beta"])


# ---------------------------------------------------------------- R6 output


@pytest.mark.parametrize("center, scale", [(False, True), (True, False), (False, False)])
def test_center_scale_off_R6(center, scale):
    x = rng(40).normal(1.0, 2.0, (12, 3)).astype(np.float32)
    layer = BN(center=center, scale=scale, momentum=0.0, epsilon=0.01)
    layer.build(x.shape)
    g, b = np.float32([2.0, 3.0, 4.0]), np.float32([1.0, -1.0, 0.5])
    ws = ([g] if scale else []) + ([b] if center else []) + [np.zeros(3, np.float32),
                                                            np.ones(3, np.float32)]
    layer.set_weights(ws)
    mu, var = moments(x)
    y = np.asarray(layer(x, training=True), np.float64)
    ref = normalize(x, mu, var, g if scale else None, b if center else None, eps=0.01)
    np.testing.assert_allclose(y, ref, **F32_TOL)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=2, max_size=4),
    axis_pick=st.integers(0, 3),
    two_axes=st.booleans(),
    momentum=st.sampled_from([0.0, 0.5, 0.99]),
    seed=st.integers(0, 1000),
)
def test_property_training_matches_reference_R4_R5_R6(shape, axis_pick, two_axes, momentum, seed):
    shape = tuple(shape)
    nd = len(shape)
    axis = axis_pick % nd
    if two_axes and nd >= 3:
        axis = sorted({axis, (axis + 2) % nd})
        if len(axis) == 1:
            axis = axis[0]
    x = rng(seed).normal(3.0, 2.0, shape).astype(np.float32)
    layer = BN(axis=axis, momentum=momentum)
    y = np.asarray(layer(x, training=True), np.float64)
    mu, var = moments(x, axis)
    np.testing.assert_allclose(y, normalize(x, mu, var, axis=axis), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layer.moving_mean, np.float64), mu * (1 - momentum),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(layer.moving_variance, np.float64),
                               momentum + var * (1 - momentum), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- R7 dtypes


BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.mark.parametrize("dtype", [np.float16, BF16, np.float32, np.float64, np.int32, np.int64,
                                   np.uint8, np.int8, np.bool_])
def test_input_dtypes_default_policy_R7_1_R7_3(dtype):
    r = rng(50)
    if np.dtype(dtype).kind in "iu":
        x = r.integers(0, 50, (16, 3)).astype(dtype)
    elif dtype is np.bool_:
        x = r.random((16, 3)) > 0.5
    else:
        x = r.normal(1.0, 2.0, (16, 3)).astype(dtype)
    layer = BN(momentum=0.0)
    y = np.asarray(layer(x, training=True))
    assert y.dtype == np.float32
    x32 = x.astype(np.float32)  # autocast to the float32 compute dtype
    mu, var = moments(x32)
    np.testing.assert_allclose(y.astype(np.float64), normalize(x32, mu, var), **F32_TOL)
    np.testing.assert_allclose(np.asarray(layer.moving_variance, np.float64), var, rtol=1e-6)
    assert layer.moving_variance.dtype == np.float32


@pytest.mark.parametrize("policy, out_dtype, tol", [
    ("float16", np.float16, 2.0**-10),
    ("mixed_float16", np.float16, 2.0**-10),
    ("mixed_bfloat16", BF16, 2.0**-7),
])
@pytest.mark.parametrize("in_dtype", [np.float32, np.float64, np.float16])
def test_16bit_policies_round_input_then_compute_R7_2_R7_3(policy, out_dtype, tol, in_dtype):
    x = rng(51).normal(1.0, 2.0, (64, 4)).astype(in_dtype)
    layer = BN(dtype=policy, momentum=0.0)
    y = np.asarray(layer(x, training=True))
    assert y.dtype == out_dtype
    for w in layer.get_weights():
        assert w.dtype == np.float32  # R7.2: never 16-bit weights
    xr = x.astype(out_dtype).astype(np.float64)  # R7.2: rounded to 16 bits first
    mu, var = moments(xr)
    ref = normalize(xr, mu, var)
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(layer.moving_variance, np.float64), var, rtol=1e-6)
    # inference
    yi = np.asarray(layer(x))
    assert yi.dtype == out_dtype
    np.testing.assert_allclose(yi.astype(np.float64), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("in_dtype", [np.float64, np.float32, np.float16, np.int32])
def test_float64_policy_computes_in_float64_R7_2_R7_3(in_dtype):
    r = rng(52)
    x = (r.normal(3.0, 2.0, (40, 3)) * (100 if in_dtype is np.int32 else 1)).astype(in_dtype)
    layer = BN(dtype="float64", momentum=0.3)
    layer.build(x.shape)
    for w in layer.get_weights():
        assert w.dtype == np.float64
    state = {n: w.astype(np.float64) for n, w in zip(NAMES4, layer.get_weights(), strict=True)}
    y = np.asarray(layer(x, training=True))
    assert y.dtype == np.float64
    y_ref, state, _, _ = train_step(x.astype(np.float64), state, momentum=0.3)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    got = weights_dict(layer)
    np.testing.assert_allclose(got["moving_mean"], state["moving_mean"], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got["moving_variance"], state["moving_variance"], rtol=1e-12)
    yi = np.asarray(layer(x))
    assert yi.dtype == np.float64
    ref_i = normalize(x, state["moving_mean"], state["moving_variance"])
    np.testing.assert_allclose(yi, ref_i, rtol=1e-12, atol=1e-12)


def test_float64_policy_keeps_float64_precision_R7_2():
    # 1e8 + k is exact in float64 but not in float32 (spacing 8 there): closed form
    # mean 1e8 + 3.5, biased variance 5.25, y = (k - 3.5) / sqrt(5.25 + eps).
    k = np.arange(8, dtype=np.float64)
    x = (1e8 + k).reshape(8, 1)
    layer = BN(dtype="float64", momentum=0.0)
    y = np.asarray(layer(x, training=True))
    np.testing.assert_allclose(layer.moving_mean, [1e8 + 3.5], rtol=1e-15)
    np.testing.assert_allclose(layer.moving_variance, [5.25], rtol=1e-12)
    np.testing.assert_allclose(y[:, 0], (k - 3.5) / np.sqrt(5.25 + 1e-3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("policy", ["float16", "mixed_float16"])
def test_moving_variance_70000_survives_16bit_policy_R7_2(policy):
    # Keras' "large value within autocast scope" test re-expressed: 70000 > float16 max (65504).
    layer = BN(dtype=policy, moving_variance_initializer={"class_name": "Constant",
                                                          "config": {"value": 70000.0}})
    layer.build((4, 2))
    assert layer.moving_variance.dtype == np.float32
    np.testing.assert_array_equal(layer.moving_variance, [70000.0, 70000.0])
    x = np.float16([[100.0, -300.0], [50.0, 0.0], [0.0, 1.0], [-2.0, 8.0]])
    y = np.asarray(layer(x))
    assert y.dtype == np.float16 and np.isfinite(y.astype(np.float32)).all()
    ref = x.astype(np.float64) / np.sqrt(70000.0 + 1e-3)
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=2**-10, atol=1e-4)
    # training on data of variance ~70000 stores it in float32 too
    xt = rng(53).normal(0.0, 300.0, (512, 2)).astype(np.float16)
    layer2 = BN(dtype=policy, momentum=0.0)
    layer2(xt, training=True)
    _, var = moments(xt)
    assert var.min() > 65504
    np.testing.assert_allclose(np.asarray(layer2.moving_variance, np.float64), var, rtol=1e-6)


@pytest.mark.parametrize("view", [
    lambda a: a[:, ::2, :],
    lambda a: a.transpose(2, 0, 1),
    lambda a: a[::-1, :, 1:],
    lambda a: np.asfortranarray(a),
    lambda a: np.broadcast_to(a[:1], a.shape),
])
@pytest.mark.parametrize("axis", [-1, 1])
def test_non_contiguous_inputs_and_input_not_modified_R6(view, axis):
    base = rng(80).normal(1.0, 2.0, (6, 8, 5)).astype(np.float32)
    x = view(base)
    keep = np.array(x, copy=True)
    layer = BN(axis=axis, momentum=0.0)
    y = np.asarray(layer(x, training=True), np.float64)
    np.testing.assert_array_equal(x, keep)
    mu, var = moments(keep, axis)
    np.testing.assert_allclose(y, normalize(keep, mu, var, axis=axis), **F32_TOL)
    np.testing.assert_allclose(np.asarray(layer.moving_variance, np.float64), var, rtol=1e-6,
                               atol=1e-12)
    yi = np.asarray(layer(x), np.float64)
    w = weights_dict(layer)
    ref = normalize(keep, w["moving_mean"], w["moving_variance"], axis=axis)
    np.testing.assert_allclose(yi, ref, **F32_TOL)


def test_set_weights_casts_to_variable_dtype_R2_2():
    layer = BN()
    layer.build((2, 3))
    layer.set_weights([np.float64([1.1, 2.2, 3.3])] * 4)
    for w in layer.get_weights():
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, np.float32([1.1, 2.2, 3.3]))
    assert layer.gamma.dtype == np.float32


def test_set_weights_virtual_batch_size_extra_leading_one_R2_2():
    layer = BN(virtual_batch_size=2)
    layer.build((4, 3, 5))
    layer.set_weights([np.full((1, 1, 1, 5), 3.0, np.float32)] * 4)
    for w in layer.get_weights():
        assert w.shape == (5,)
        np.testing.assert_array_equal(w, 3.0)
