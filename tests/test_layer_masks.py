"""Masks in cbn.BatchNormalization's training calls (behaviour.md R8): which positions count in
the statistics, fully and partly masked batches and channels, mask shapes and axes. Every
expected value comes from tests/reference.py (float64 NumPy) or numbers derived by hand."""

from __future__ import annotations

import cbn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from layer_state import F32_TOL, NAMES4, rng, set_state, weights_dict
from reference import normalize, snapshot, train_step

BN = cbn.BatchNormalization


# ---------------------------------------------------------------- R8 masks


def _check_masked_training(x, mask, axis=-1, momentum=0.5, eps=1e-3):
    layer = BN(axis=axis, momentum=momentum, epsilon=eps)
    layer.build(x.shape)
    cs = tuple(x.shape[a] for a in sorted(np.atleast_1d(axis) % x.ndim))
    r = rng(60)
    vals = [r.uniform(0.5, 2.0, cs), r.uniform(-1, 1, cs), r.uniform(-1, 1, cs),
            r.uniform(0.5, 2, cs)]
    vals = [v.astype(np.float32) for v in vals]
    layer.set_weights(vals)
    state = dict(zip(NAMES4, [v.astype(np.float64) for v in vals], strict=True))
    y = np.asarray(layer(x, training=True, mask=mask), np.float64)
    y_ref, new, mu, var = train_step(x, state, momentum=momentum, eps=eps, axis=axis, mask=mask)
    assert np.isfinite(y).all()
    scale = max(1.0, np.abs(y_ref).max())
    np.testing.assert_allclose(y, y_ref, rtol=2e-6, atol=2e-6 * scale)
    got = weights_dict(layer)
    np.testing.assert_allclose(got["moving_mean"], new["moving_mean"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["moving_variance"], new["moving_variance"], rtol=1e-6,
                               atol=1e-7)
    return layer, mu, var


def test_mask_one_dim_fewer_R8_1a_R8_2_R8_4():
    # Keras: a (B, T) mask for a (B, T, F) input
    r = rng(61)
    x = r.normal(2.0, 3.0, (4, 6, 3)).astype(np.float32)
    mask = r.random((4, 6)) > 0.4
    mask[0, 0] = True
    _check_masked_training(x, mask)


@pytest.mark.parametrize("mshape", [(4, 6, 1), (4, 1, 3), (1, 6, 3), (4, 6, 3), (1, 1, 3),
                                    (1, 6, 1)])
def test_mask_rank_matching_broadcast_R8_1b(mshape):
    r = rng(62)
    x = r.normal(-1.0, 2.0, (4, 6, 3)).astype(np.float32)
    mask = r.random(mshape) > 0.3
    mask.flat[0] = True
    _check_masked_training(x, mask)


def test_masked_positions_do_not_affect_statistics_R8_2():
    r = rng(63)
    x = r.normal(1.0, 2.0, (8, 5, 2)).astype(np.float32)
    mask = r.random((8, 5)) > 0.5
    mask[0, :2] = True
    x[~mask] = 1e6  # huge finite values where masked
    layer = BN(momentum=0.0)
    y = np.asarray(layer(x, training=True, mask=mask), np.float64)
    used = x[mask].astype(np.float64)  # (n_used, 2): independent of reference.py
    mu, var = used.mean(axis=0), used.var(axis=0)
    np.testing.assert_allclose(np.asarray(layer.moving_mean, np.float64), mu, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(layer.moving_variance, np.float64), var, rtol=1e-6)
    # R8.4: every position is normalized with those statistics, masked ones too
    ref = (x - mu) / np.sqrt(var + 1e-3)
    np.testing.assert_allclose(y[mask], ref[mask], rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(y[~mask], ref[~mask], rtol=2e-6)


def test_numeric_mask_nonzero_means_used_R8_1():
    r = rng(64)
    x = r.normal(1.0, 2.0, (6, 5, 2)).astype(np.float32)
    mask_f = np.where(r.random((6, 5)) > 0.5, r.choice([0.5, 2.0, -3.0], (6, 5)), 0.0)
    mask_f[0, 0] = 1.0
    for m in (mask_f, mask_f.astype(np.float32), (mask_f != 0).astype(np.int32)):
        _check_masked_training(x, m)


def test_fully_masked_input_uses_zero_stats_R8_3():
    r = rng(65)
    x = r.normal(1.0, 2.0, (4, 5, 3)).astype(np.float32)
    layer, mu, var = _check_masked_training(x, np.zeros((4, 5), bool), momentum=0.25)
    np.testing.assert_array_equal(mu, 0.0)
    np.testing.assert_array_equal(var, 0.0)
    # closed form: y = x * gamma / sqrt(eps) + beta
    w = weights_dict(layer)
    y = np.asarray(layer(x, training=True, mask=np.zeros((4, 5), bool)), np.float64)
    ref = x * w["gamma"] / np.sqrt(1e-3) + w["beta"]
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=1e-5)


def test_one_channel_fully_masked_R8_3():
    r = rng(66)
    x = r.normal(3.0, 2.0, (5, 4, 3)).astype(np.float32)
    mask = np.ones((1, 1, 3), bool)
    mask[..., 1] = False
    layer, mu, var = _check_masked_training(x, mask, momentum=0.5)
    assert mu[1] == 0.0 and var[1] == 0.0


def test_single_used_position_gives_beta_there_R8_2():
    r = rng(67)
    x = r.normal(3.0, 2.0, (3, 4, 2)).astype(np.float32)
    mask = np.zeros((3, 4), bool)
    mask[1, 2] = True
    layer = BN(momentum=0.0)
    layer.build(x.shape)
    beta = np.float32([0.25, -4.0])
    layer.set_weights([np.float32([2.0, 3.0]), beta, np.zeros(2, np.float32),
                       np.ones(2, np.float32)])
    y = np.asarray(layer(x, training=True, mask=mask))
    np.testing.assert_array_equal(y[1, 2], beta)
    np.testing.assert_array_equal(layer.moving_variance, [0.0, 0.0])
    ref = (x - x[1, 2]).astype(np.float64) * np.array([2.0, 3.0]) / np.sqrt(1e-3) + beta
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=2e-6, atol=1e-5)


def test_inference_ignores_mask_R8_5():
    r = rng(68)
    x = r.normal(1.0, 2.0, (4, 5, 3)).astype(np.float32)
    layer = BN()
    st0 = set_state(layer, x.shape)
    before = snapshot(layer)
    y = np.asarray(layer(x, training=False, mask=np.zeros((4, 5), bool)), np.float64)
    ref = normalize(x, st0["moving_mean"], st0["moving_variance"], st0["gamma"], st0["beta"])
    np.testing.assert_allclose(y, ref, **F32_TOL)
    for a, b in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_trainable_false_ignores_mask_R3_1_R8_5():
    x = rng(69).normal(1.0, 2.0, (4, 5, 3)).astype(np.float32)
    layer = BN(trainable=False)
    y = np.asarray(layer(x, training=True, mask=np.ones((4, 5), bool)), np.float64)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-3), **F32_TOL)


@pytest.mark.parametrize("mshape", [(4, 3), (4, 1, 6), (1, 3, 1), (4, 3, 6)])
def test_mask_with_axis1_R8_6(mshape):
    r = rng(70)
    x = r.normal(2.0, 1.5, (4, 3, 6)).astype(np.float32)
    mask = r.random(mshape) > 0.35
    mask.flat[0] = True
    _check_masked_training(x, mask, axis=1)


@pytest.mark.parametrize("mshape", [(3, 4, 2), (3, 4, 2, 1), (3, 1, 2, 5), (3, 4, 2, 5)])
def test_mask_with_axis_list_R8_6(mshape):
    r = rng(71)
    x = r.normal(2.0, 1.5, (3, 4, 2, 5)).astype(np.float32)
    mask = r.random(mshape) > 0.35
    mask.flat[0] = True
    _check_masked_training(x, mask, axis=[1, 3])


@pytest.mark.parametrize("shape, mshape, axis", [((4, 6, 1), (4, 6), -1), ((5, 1), (5,), -1),
                                                 ((4, 1, 6), (4, 1, 6), 1), ((4, 1, 6), (4, 1), 1)])
def test_mask_with_single_channel_R8_6(shape, mshape, axis):
    r = rng(72)
    x = r.normal(2.0, 1.5, shape).astype(np.float32)
    mask = r.random(mshape) > 0.35
    mask.flat[0] = True
    mask.flat[-1] = True
    _check_masked_training(x, mask, axis=axis)


@settings(max_examples=30, deadline=None)
@given(
    shape=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    axis_pick=st.integers(0, 3),
    rank_matching=st.booleans(),
    ones=st.lists(st.booleans(), min_size=4, max_size=4),
    p_used=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    seed=st.integers(0, 1000),
)
def test_property_masked_training_matches_reference_R8(shape, axis_pick, rank_matching, ones,
                                                       p_used, seed):
    shape = tuple(shape)
    axis = axis_pick % len(shape)
    r = rng(seed)
    if rank_matching:
        mshape = tuple(1 if o else s for s, o in zip(shape, ones, strict=False))
    else:
        mshape = shape[:-1]
    mask = r.random(mshape) < p_used
    x = r.normal(2.0, 3.0, shape).astype(np.float32)
    _check_masked_training(x, mask, axis=axis)
