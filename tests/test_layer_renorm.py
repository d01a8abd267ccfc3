"""Batch renormalization (behaviour.md R11) and its argument checks (R1.4), against the float64
NumPy reference in tests/reference.py."""

from __future__ import annotations

import re

import cbn
import numpy as np
import pytest
from reference import assert_unchanged, normalize, renorm_step, snapshot

BN = cbn.BatchNormalization
NAMES7 = ["gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean",
          "renorm_stddev"]


def state_of(layer):
    return {n: np.asarray(w, np.float64) for n, w in zip(NAMES7, layer.get_weights(), strict=True)}


def check_state(layer, ref, rtol=2e-6, atol=2e-6):
    got = state_of(layer)
    for n in NAMES7:
        np.testing.assert_allclose(got[n], ref[n], rtol=rtol, atol=atol, err_msg=n)


def batches(n, shape, seed=0):
    r = np.random.default_rng(seed)
    return [(r.normal(0.0, 1.0, shape) * (1.0 + 2.0 * k) + 3.0 * k - 2.0).astype(np.float32)
            for k in range(n)]


@pytest.mark.parametrize("clipping", [
    {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0},
    {"rmax": 1.5},
    {"rmin": 0.8},
    {"dmax": 0.25},
    None,
    {},
])
def test_renorm_steps_match_reference_R11(clipping):
    layer = BN(renorm=True, renorm_clipping=clipping, momentum=0.7, renorm_momentum=0.5)
    layer.build((16, 3))
    r = np.random.default_rng(1)
    gamma, beta = r.uniform(0.5, 2.0, 3).astype(np.float32), r.uniform(-1, 1, 3).astype(np.float32)
    ws = layer.get_weights()
    ws[0], ws[1] = gamma, beta
    layer.set_weights(ws)
    ref = state_of(layer)
    for x in batches(5, (16, 3)):
        y = np.asarray(layer(x, training=True), np.float64)
        y_ref, ref = renorm_step(x, ref, momentum=0.7, renorm_momentum=0.5, clipping=clipping)
        scale = max(1.0, np.abs(y_ref).max())
        np.testing.assert_allclose(y, y_ref, rtol=2e-6, atol=2e-6 * scale)
        check_state(layer, ref)


CLIPPINGS = [{"rmax": 2.0, "rmin": 0.5, "dmax": 1.0}, {"rmax": 1.5}, {"rmin": 0.8},
             {"dmax": 0.25}]


@pytest.mark.parametrize("clipping", CLIPPINGS)
def test_clipping_is_active_in_the_test_data_R11(clipping):
    # Guard for the test above (reference only): on its data each clipping really changes the
    # output, so rmax / rmin / dmax are exercised.
    st = {n: np.float64([v] * 3) for n, v in zip(NAMES7, [1, 0, 0, 1, 1, 0, 1], strict=True)}
    a, b, diff = dict(st), dict(st), 0.0
    for x in batches(5, (16, 3)):
        ya, a = renorm_step(x, a, momentum=0.7, renorm_momentum=0.5, clipping=clipping)
        yb, b = renorm_step(x, b, momentum=0.7, renorm_momentum=0.5, clipping=None)
        diff = max(diff, np.abs(ya - yb).max())
    assert diff > 0.1


def test_renorm_uses_sqrt_eps_floor_for_renorm_stddev_R11():
    eps = 0.01
    layer = BN(renorm=True, epsilon=eps, renorm_clipping={"rmax": 1e9, "rmin": 0.0, "dmax": 1e9},
               momentum=0.5, renorm_momentum=0.5)
    layer.build((8, 2))
    ws = layer.get_weights()
    ws[6] = np.float32([0.0, 1e-6])  # renorm_stddev below sqrt(eps) = 0.1
    ws[5] = np.float32([0.5, -0.5])  # renorm_mean
    layer.set_weights(ws)
    ref = state_of(layer)
    x = batches(1, (8, 2), seed=3)[0]
    y = np.asarray(layer(x, training=True), np.float64)
    y_ref, ref = renorm_step(x, ref, momentum=0.5, renorm_momentum=0.5, eps=eps,
                             clipping={"rmax": 1e9, "rmin": 0.0, "dmax": 1e9})
    np.testing.assert_allclose(y, y_ref, rtol=2e-6, atol=2e-6 * np.abs(y_ref).max())
    check_state(layer, ref)


def test_renorm_with_center_scale_off_R11():
    clipping = {"rmax": 1.5, "rmin": 0.7, "dmax": 0.5}
    layer = BN(renorm=True, center=False, scale=False, renorm_clipping=clipping, momentum=0.6,
               renorm_momentum=0.4)
    layer.build((10, 2))
    names = NAMES7[2:]
    ref = {n: np.asarray(w, np.float64) for n, w in zip(names, layer.get_weights(), strict=True)}
    for x in batches(3, (10, 2), seed=4):
        y = np.asarray(layer(x, training=True), np.float64)
        y_ref, ref = renorm_step(x, ref, momentum=0.6, renorm_momentum=0.4, clipping=clipping)
        np.testing.assert_allclose(y, y_ref, rtol=2e-6, atol=2e-6 * max(1, np.abs(y_ref).max()))
        ws = [np.asarray(w, np.float64) for w in layer.get_weights()]
        got = dict(zip(names, ws, strict=True))
        for n in names:
            np.testing.assert_allclose(got[n], ref[n], rtol=2e-6, atol=2e-6, err_msg=n)


def test_renorm_axis1_and_mask_R11_R8():
    # renorm's mu and sigma^2 are the (masked) batch statistics (R8.2)
    clipping = {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0}
    layer = BN(renorm=True, axis=1, renorm_clipping=clipping, momentum=0.5, renorm_momentum=0.5)
    layer.build((4, 3, 5))
    ref = state_of(layer)
    r = np.random.default_rng(6)
    for x in batches(3, (4, 3, 5), seed=5):
        mask = r.random((4, 1, 5)) > 0.3
        mask[0, 0, 0] = True
        y = np.asarray(layer(x, training=True, mask=mask), np.float64)
        y_ref, ref = renorm_step(x, ref, momentum=0.5, renorm_momentum=0.5, clipping=clipping,
                                 axis=1, mask=mask)
        np.testing.assert_allclose(y, y_ref, rtol=2e-6, atol=2e-6 * max(1, np.abs(y_ref).max()))
        check_state(layer, ref)


def test_renorm_inference_is_plain_bn_with_moving_stats_R11():
    clipping = {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0}
    layer = BN(renorm=True, renorm_clipping=clipping, momentum=0.7, renorm_momentum=0.5)
    layer.build((16, 3))
    ref = state_of(layer)
    for x in batches(4, (16, 3)):
        layer(x, training=True)
        _, ref = renorm_step(x, ref, momentum=0.7, renorm_momentum=0.5, clipping=clipping)
    got = state_of(layer)
    before = snapshot(layer)
    x = batches(1, (32, 3), seed=9)[0]
    y = np.asarray(layer(x, training=False), np.float64)
    # plain BN with the layer's own moving statistics ...
    y_ref = normalize(x, got["moving_mean"], got["moving_variance"], got["gamma"], got["beta"])
    np.testing.assert_allclose(y, y_ref, rtol=2e-6, atol=2e-6)
    # ... which are the reference's, and a plain layer holding them gives the same output
    np.testing.assert_allclose(got["moving_variance"], ref["moving_variance"], rtol=2e-6)
    plain = BN()
    plain.build((32, 3))
    plain.set_weights(layer.get_weights()[:4])
    np.testing.assert_allclose(np.asarray(plain(x), np.float64), y, rtol=1e-6, atol=1e-6)
    assert_unchanged(layer, before)


def test_renorm_trainable_false_is_inference_R11_R3_1():
    layer = BN(renorm=True, renorm_clipping={"rmax": 2.0}, trainable=False)
    layer.build((8, 2))
    before = snapshot(layer)
    x = batches(1, (8, 2), seed=10)[0]
    y = np.asarray(layer(x, training=True), np.float64)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-3), rtol=2e-6, atol=2e-6)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("mv_init, mm_init", [(4.0, 0.5), (0.25, -1.0), (1.0, 0.0)])
def test_renorm_stddev_initialized_from_variance_initializer_R11(mv_init, mm_init):
    layer = BN(renorm=True,
               moving_variance_initializer={"class_name": "Constant", "config": {"value": mv_init}},
               moving_mean_initializer={"class_name": "Constant", "config": {"value": mm_init}})
    layer.build((2, 3))
    st = state_of(layer)
    np.testing.assert_allclose(st["moving_stddev"], np.sqrt(mv_init), rtol=1e-7)
    np.testing.assert_allclose(st["renorm_stddev"], np.sqrt(mv_init), rtol=1e-7)
    np.testing.assert_allclose(st["renorm_mean"], mm_init, rtol=1e-7)
    np.testing.assert_allclose(st["moving_variance"], mv_init, rtol=1e-7)
    np.testing.assert_allclose(st["moving_mean"], mm_init, rtol=1e-7)


def test_renorm_weight_attributes_R11_R2_2():
    layer = BN(renorm=True)
    assert layer.moving_stddev is None and layer.renorm_mean is None
    layer.build((2, 4))
    for n in NAMES7:
        attr = getattr(layer, n)
        assert isinstance(attr, np.ndarray) and attr.shape == (4,) and attr.dtype == np.float32
    assert len(layer.trainable_weights) == 2
    assert len(layer.non_trainable_weights) == 5


def test_renorm_float64_policy_R11_R7_2():
    clipping = {"rmax": 2.0, "rmin": 0.5, "dmax": 1.0}
    layer = BN(renorm=True, dtype="float64", renorm_clipping=clipping, momentum=0.7,
               renorm_momentum=0.5)
    layer.build((16, 3))
    ref = state_of(layer)
    for x in batches(3, (16, 3)):
        x = x.astype(np.float64)
        y = np.asarray(layer(x, training=True))
        assert y.dtype == np.float64
        y_ref, ref = renorm_step(x, ref, momentum=0.7, renorm_momentum=0.5, clipping=clipping)
        np.testing.assert_allclose(y, y_ref, rtol=1e-11, atol=1e-11)
        check_state(layer, ref, rtol=1e-11, atol=1e-12)


# ---------------------------------------------------------------- R1.4 renorm_clipping checks


def test_clipping_rmax_below_rmin_names_values_R1_4():
    with pytest.raises(ValueError) as info:
        BN(renorm=True, renorm_clipping={"rmax": 0.25, "rmin": 1.5})
    msg = str(info.value)
    assert "0.25" in msg and "1.5" in msg
    assert "{rmax}" not in msg


def test_clipping_negative_dmax_names_value_R1_4():
    with pytest.raises(ValueError, match=re.escape("-0.75")):
        BN(renorm=True, renorm_clipping={"dmax": -0.75})


def test_clipping_unknown_key_names_it_R1_4():
    with pytest.raises(ValueError, match="rmean"):
        BN(renorm=True, renorm_clipping={"rmax": 2.0, "rmean": 1.0})


@pytest.mark.parametrize("clipping", [{"rmax": 1.0, "rmin": 1.0}, {"dmax": 0.0}, {"rmin": 5.0},
                                      {"rmax": 0.1}])
def test_clipping_edge_values_accepted_R1_4(clipping):
    BN(renorm=True, renorm_clipping=clipping)


def test_clipping_not_validated_without_renorm_R1_4():
    BN(renorm=False, renorm_clipping={"rmax": 0.25, "rmin": 1.5, "dmax": -1.0})
    BN(renorm_clipping={"bogus": 1.0})
