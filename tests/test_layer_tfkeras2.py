"""tf.keras 2 extras of cbn.BatchNormalization: ghost batch normalization (behaviour.md R12),
adjustment (R13) and fused (R1.5); tf.keras 2 configs and weight shapes (R10.2, R2.2) are in
test_layer_tfkeras2_configs.py.

tf.keras 2's own ghost-BN and adjustment tests (TensorFlow's normalization_test.py: testGhostBN*,
testAdjustment, testRenormWithAdjustment) are re-expressed here against ``reference_step``, a
float64 NumPy transcription of the rules (tfkeras2_reference.py), and against hand-derived
numbers.
"""

from __future__ import annotations

import re

import cbn
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    assert_unchanged,
    axes_of,
    bshape,
    normalize,
    snapshot,
    to64,
)
from tfkeras2_reference import (
    assert_output,
    assert_state,
    batches,
    reference_step,
    state_of,
    with_weights,
)

BN = cbn.BatchNormalization


def test_reference_groups_strided_samples_R12():
    # Guard for the reference itself: B=8, V=4 -> ghost batches {0,2,4,6} and {1,3,5,7}.
    x = np.float64([1, 100, 3, 100, 5, 100, 7, 100]).reshape(8, 1)
    state = {"moving_mean": np.zeros(1), "moving_variance": np.ones(1)}
    y, new = reference_step(x, state, virtual_batch_size=4, momentum=0.0)
    np.testing.assert_allclose(y[0::2, 0], np.float64([-3, -1, 1, 3]) / np.sqrt(5.001))
    np.testing.assert_array_equal(y[1::2, 0], 0.0)
    np.testing.assert_allclose(new["moving_mean"], [52.0])
    np.testing.assert_allclose(new["moving_variance"], [2.5])


# ---------------------------------------------------------------- R12 ghost batch normalization


def test_ghost_batches_are_strided_sample_sets_hand_numbers_R12():
    # B=8, V=4: ghost 0 = samples {0,2,4,6} = 1,3,5,7 (mean 4, var (9+1+1+9)/4 = 5),
    # ghost 1 = samples {1,3,5,7} = 100 (mean 100, var 0). A contiguous split ({0..3}, {4..7})
    # would mix them. momentum 0: the moving statistics become the ghost averages 52 and 2.5.
    layer = BN(virtual_batch_size=4, momentum=0.0)
    x = np.float32([1, 100, 3, 100, 5, 100, 7, 100]).reshape(8, 1)
    y = np.asarray(layer(x, training=True), np.float64)
    np.testing.assert_allclose(y[0::2, 0], np.float64([-3, -1, 1, 3]) / np.sqrt(5.001),
                               rtol=1e-6)
    np.testing.assert_array_equal(y[1::2, 0], 0.0)
    np.testing.assert_allclose(layer.moving_mean, [52.0], rtol=1e-7)
    np.testing.assert_allclose(layer.moving_variance, [2.5], rtol=1e-7)


@pytest.mark.parametrize("shape, axis", [((6, 5, 4, 3), -1), ((6, 3, 4, 5), 1),
                                         ((6, 3, 4, 5), [1, 3]), ((6, 2), -1)])
def test_virtual_batch_equal_to_batch_is_plain_bn_R12(shape, axis):
    # tf.keras 2 testGhostBNVirtualBatchFull: V = B is one ghost batch, i.e. plain BN.
    ghost, plain = BN(axis=axis, virtual_batch_size=shape[0], momentum=0.5), BN(axis=axis,
                                                                                 momentum=0.5)
    ref = with_weights(ghost, shape)
    plain.build(shape)
    plain.set_weights(ghost.get_weights())
    for x in batches(3, shape):
        y_ref, ref = reference_step(x, ref, axis=axis, momentum=0.5)  # no virtual_batch_size
        assert_output(ghost(x, training=True), y_ref)
        assert_output(plain(x, training=True), y_ref)
        assert_state(ghost, ref)
        assert_state(plain, ref)


GHOST_CASES = [
    # tf.keras 2 testGhostBN2Dims, testGhostBN4DimsAxis3, testGhostBN4DimsAxis1, plus axis lists
    ((6, 2), 3, -1),
    ((6, 10, 10, 3), 2, 3),
    ((6, 3, 10, 10), 2, 1),
    ((6, 3, 4, 5), 3, [1, 3]),
    ((12, 4, 3), 3, [-1, 1]),
    ((8, 5), 1, -1),          # V = 1: every sample its own ghost batch
]


@pytest.mark.parametrize("shape, vbs, axis", GHOST_CASES)
def test_ghost_bn_steps_match_reference_R12(shape, vbs, axis):
    layer = BN(axis=axis, virtual_batch_size=vbs, momentum=0.8)
    ref = with_weights(layer, shape)
    for x in batches(4, shape, seed=2):
        y_ref, ref = reference_step(x, ref, axis=axis, virtual_batch_size=vbs, momentum=0.8)
        y = layer(x, training=True)
        assert y.dtype == np.float32 and y.shape == x.shape
        assert_output(y, y_ref)
        assert_state(layer, ref)
        # inference: plain BN with the moving statistics, V ignored (R12, R6)
        y_inf = normalize(x, ref["moving_mean"], ref["moving_variance"], ref["gamma"],
                          ref["beta"], axis=axis)
        assert_output(layer(x, training=False), y_inf)


@pytest.mark.parametrize("view", ["reversed", "transposed", "sliced"])
def test_ghost_grouping_follows_logical_batch_index_of_views_R12(view):
    # The ghost view is built from strides, so non-contiguous inputs group the same samples.
    base = batches(1, (8, 6, 5), seed=3)[0]
    x = {"reversed": base[::-1], "transposed": base.transpose(0, 2, 1),
         "sliced": base[:, ::2, 1:]}[view]
    layer = BN(virtual_batch_size=2, momentum=0.5)
    ref = with_weights(layer, x.shape)
    y_ref, ref = reference_step(x, ref, virtual_batch_size=2, momentum=0.5)
    assert_output(layer(x, training=True), y_ref)
    assert_state(layer, ref)


def test_ghost_inference_any_batch_size_R12():
    # tf.keras 2 testGhostBNUnknownBatchSize: inference accepts batches V does not divide.
    layer = BN(virtual_batch_size=4, momentum=0.5)
    ref = with_weights(layer, (8, 3))
    for b in (1, 5, 7, 10):
        x = batches(1, (b, 3), seed=b)[0]
        y_ref = normalize(x, ref["moving_mean"], ref["moving_variance"], ref["gamma"],
                          ref["beta"])
        assert_output(layer(x), y_ref)
        assert_output(layer(x, training=False), y_ref)
    assert_state(layer, ref)


@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("batch", [6, 9, 3])
def test_ghost_batch_not_divisible_raises_and_changes_nothing_R12_R5_2(renorm, batch):
    layer = BN(virtual_batch_size=4, renorm=renorm, momentum=0.5)
    layer.build((8, 3))
    layer(batches(1, (8, 3))[0], training=True)
    before = snapshot(layer)
    with pytest.raises(ValueError, match=re.escape("virtual_batch_size=4")) as info:
        layer(batches(1, (batch, 3))[0], training=True)
    assert f"({batch}, 3)" in str(info.value)
    assert_unchanged(layer, before)


def test_ghost_not_trainable_is_inference_R12_R3_1():
    layer = BN(virtual_batch_size=4, trainable=False)
    layer.build((6, 2))
    before = snapshot(layer)
    x = batches(1, (6, 2))[0]  # 6 is not divisible by 4: inference ignores V
    assert_output(layer(x, training=True), x / np.sqrt(1.001))
    assert_unchanged(layer, before)


@pytest.mark.parametrize("mask_kind", ["keras", "broadcast_batch", "per_position"])
def test_ghost_with_mask_R12_R8(mask_kind):
    shape = (8, 5, 3)
    r = np.random.default_rng(4)
    mask = {"keras": r.random((8, 5)) > 0.3,              # (B, T) for (B, T, F), R8.1 (a)
            "broadcast_batch": r.random((1, 5, 3)) > 0.3,  # R8.1 (b), shared by all samples
            "per_position": r.random(shape) > 0.3}[mask_kind]
    layer = BN(virtual_batch_size=4, momentum=0.6)
    ref = with_weights(layer, shape)
    for x in batches(3, shape, seed=5):
        y_ref, ref = reference_step(x, ref, virtual_batch_size=4, mask=mask, momentum=0.6)
        assert_output(layer(x, training=True, mask=mask), y_ref)
        assert_state(layer, ref)


def test_ghost_batch_without_used_position_counts_as_zero_R12_R8_3():
    # Ghost 0 = samples {0, 2} all masked: its mean and variance are 0 (R8.3), and the
    # averages over the two ghost batches include them. Ghost 1 = samples {1, 3} = 2, 6:
    # mean 4, var 4. momentum 0 -> moving mean (0 + 4)/2 = 2, moving variance (0 + 4)/2 = 2.
    x = np.float32([10, 2, 30, 6]).reshape(4, 1)
    mask = np.array([[False], [True], [False], [True]])
    layer = BN(virtual_batch_size=2, momentum=0.0)
    y = np.asarray(layer(x, training=True, mask=mask), np.float64)
    np.testing.assert_allclose(y[:, 0], [10 / np.sqrt(1e-3), -2 / np.sqrt(4.001),
                                         30 / np.sqrt(1e-3), 2 / np.sqrt(4.001)], rtol=1e-6)
    np.testing.assert_allclose(layer.moving_mean, [2.0], rtol=1e-7)
    np.testing.assert_allclose(layer.moving_variance, [2.0], rtol=1e-7)


def test_ghost_empty_batch_R12_R8_3():
    # B = 0 has no ghost batch: statistics 0, like a channel without a used position.
    layer = BN(virtual_batch_size=4, momentum=0.5)
    layer.build((8, 2))
    y = layer(np.zeros((0, 2), np.float32), training=True)
    assert y.shape == (0, 2)
    np.testing.assert_array_equal(layer.moving_mean, [0.0, 0.0])
    np.testing.assert_array_equal(layer.moving_variance, [0.5, 0.5])


@pytest.mark.parametrize("clipping", [{"rmax": 1.2, "rmin": 0.8, "dmax": 0.3}, None])
def test_ghost_with_renorm_uses_averaged_statistics_R12_R11(clipping):
    shape = (8, 4, 3)
    layer = BN(virtual_batch_size=2, renorm=True, renorm_clipping=clipping, momentum=0.7,
               renorm_momentum=0.5)
    ref = with_weights(layer, shape)
    for x in batches(4, shape, seed=6):
        y_ref, ref = reference_step(x, ref, virtual_batch_size=2, momentum=0.7, renorm=True,
                                    renorm_momentum=0.5, clipping=clipping)
        assert_output(layer(x, training=True), y_ref)
        assert_state(layer, ref)


def test_ghost_renorm_test_data_exercises_clipping_and_ghosts_R12_R11():
    # Guard for the test above (reference only): clipping changes the output, and r, d from the
    # ghost averages differ from r, d of the whole batch, so both are exercised.
    shape = (8, 4, 3)
    start = {"gamma": np.ones(3), "beta": np.zeros(3), "moving_mean": np.zeros(3),
             "moving_variance": np.ones(3), "moving_stddev": np.ones(3),
             "renorm_mean": np.zeros(3), "renorm_stddev": np.ones(3)}
    kw = dict(momentum=0.7, renorm=True, renorm_momentum=0.5)
    clipped, free, whole = dict(start), dict(start), dict(start)
    diff_clip = diff_whole = 0.0
    for x in batches(4, shape, seed=6):
        y_c, clipped = reference_step(x, clipped, virtual_batch_size=2,
                                      clipping={"rmax": 1.2, "rmin": 0.8, "dmax": 0.3}, **kw)
        y_f, free = reference_step(x, free, virtual_batch_size=2, **kw)
        _, whole = reference_step(x, whole, **kw)
        diff_clip = max(diff_clip, np.abs(y_c - y_f).max())
        diff_whole = max(diff_whole, np.abs(free["renorm_stddev"] - whole["renorm_stddev"]).max())
    assert diff_clip > 0.1 and diff_whole > 1e-3


def test_ghost_float64_policy_R12_R7_2():
    shape = (6, 4, 3)
    layer = BN(virtual_batch_size=3, dtype="float64", momentum=0.8, renorm=True,
               renorm_clipping={"rmax": 1.5})
    ref = with_weights(layer, shape)
    for x in batches(3, shape, seed=7):
        x = x.astype(np.float64)
        y_ref, ref = reference_step(x, ref, virtual_batch_size=3, momentum=0.8, renorm=True,
                                    clipping={"rmax": 1.5})
        y = layer(x, training=True)
        assert y.dtype == np.float64
        np.testing.assert_allclose(y, y_ref, rtol=1e-11, atol=1e-11)
        assert_state(layer, ref, rtol=1e-11, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    ghosts=st.integers(1, 4),
    vbs=st.integers(1, 4),
    rest=st.lists(st.integers(1, 4), min_size=1, max_size=3),
    axis_pick=st.integers(0, 2),
    masked=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_ghost_bn_property_matches_reference_R12(ghosts, vbs, rest, axis_pick, masked, seed):
    shape = (ghosts * vbs, *rest)
    rank = len(shape)
    axis = [-1, 1, list(range(1, rank))][axis_pick]
    r = np.random.default_rng(seed)
    x = (r.normal(3.0, 2.0, shape)).astype(np.float32)
    mask = r.random(shape[:-1]) > 0.25 if masked and rank > 1 else None
    layer = BN(axis=axis, virtual_batch_size=vbs, momentum=0.5)
    ref = with_weights(layer, shape, seed=seed)
    y_ref, ref = reference_step(x, ref, axis=axis, virtual_batch_size=vbs, mask=mask,
                                momentum=0.5)
    assert_output(layer(x, training=True, mask=mask), y_ref, tol=4e-6)
    assert_state(layer, ref, rtol=4e-6, atol=4e-6)


# ---------------------------------------------------------------- R13 adjustment


def test_adjustment_matches_reference_and_inference_ignores_it_R13():
    # tf.keras 2 testAdjustment: shape (4, 3), gamma 2, beta 3, new random adjustment each call.
    r = np.random.default_rng(8)
    current = {}

    def adjustment(shape):
        current["scale"] = r.uniform(0.5, 1.5, shape[-1:])
        current["bias"] = r.uniform(-0.2, 0.2, shape[-1:])
        return current["scale"], current["bias"]

    layer = BN(axis=1, gamma_initializer={"class_name": "Constant", "config": {"value": 2.0}},
               beta_initializer={"class_name": "Constant", "config": {"value": 3.0}},
               adjustment=adjustment)
    layer.build((4, 3))
    ref = state_of(layer)
    for x in batches(5, (4, 3), seed=9):
        y = layer(x, training=True)
        y_ref, ref = reference_step(x, ref, axis=1,
                                    adjust=(current["scale"], current["bias"]))
        assert_output(y, y_ref)
        assert_state(layer, ref)
        y_test = normalize(x, ref["moving_mean"], ref["moving_variance"], ref["gamma"],
                           ref["beta"], axis=1)
        assert_output(layer(x, training=False), y_test)


def test_renorm_with_adjustment_order_R13_R11():
    # tf.keras 2 testRenormWithAdjustment: y = ((x̂·r + d)·a_scale + a_bias)·γ + β.
    r = np.random.default_rng(10)
    adjust = (r.uniform(0.5, 1.5, 3), r.uniform(-0.2, 0.2, 3))
    clipping = {"rmax": 1.1, "rmin": 0.9, "dmax": 0.1}
    layer = BN(renorm=True, renorm_clipping=clipping, renorm_momentum=0.8,
               gamma_initializer={"class_name": "Constant", "config": {"value": 2.0}},
               beta_initializer={"class_name": "Constant", "config": {"value": 3.0}},
               adjustment=lambda shape: adjust)
    layer.build((4, 3))
    ref = state_of(layer)
    for x in batches(5, (4, 3), seed=11):
        y_ref, ref = reference_step(x, ref, renorm=True, renorm_momentum=0.8, clipping=clipping,
                                    adjust=adjust)
        assert_output(layer(x, training=True), y_ref)
        assert_state(layer, ref)


def test_adjustment_order_is_observable_in_test_data_R13():
    # Guard (reference only): on the data above, applying the adjustment inside the renorm
    # correction instead, ((x̂·a_scale + a_bias)·r + d)·γ + β, gives a different output.
    r = np.random.default_rng(10)
    a_scale, a_bias = r.uniform(0.5, 1.5, 3), r.uniform(-0.2, 0.2, 3)
    x = to64(batches(1, (4, 3), seed=11)[0])
    mean, var = x.mean(0), x.var(0)
    xhat = (x - mean) / np.sqrt(var + 1e-3)
    rr = np.clip(np.sqrt(var + 1e-3), 0.9, 1.1)  # renorm_stddev starts at 1, renorm_mean at 0
    dd = np.clip(mean, -0.1, 0.1)
    ours = (xhat * rr + dd) * a_scale + a_bias
    swapped = (xhat * a_scale + a_bias) * rr + dd
    assert np.abs(ours - swapped).max() > 0.05


def test_adjustment_receives_input_shape_training_only_R13():
    calls = []

    def adjustment(shape):
        calls.append(shape)
        return 1.0, 0.0

    layer = BN(axis=1, adjustment=adjustment)
    x = batches(1, (4, 3, 5), seed=12)[0]
    layer(x)
    layer(x, training=False)
    assert calls == []
    layer(x, training=True)
    assert calls == [(4, 3, 5)]
    assert all(isinstance(d, int) for d in calls[0])
    layer.trainable = False
    layer(x, training=True)
    assert calls == [(4, 3, 5)]


@pytest.mark.parametrize("shape, axis, form", [
    ((4, 3), -1, "scalar"),
    ((4, 3), -1, "python"),
    ((4, 3), -1, "channel"),
    ((4, 3, 5, 5), 1, "broadcast"),       # (1, C, 1, 1) as tf.keras 2 needs for axis=1
    ((4, 3, 5, 5), 1, "channel"),
    ((4, 3, 2, 5), [1, 3], "channel"),    # (3, 5)
    ((4, 3, 2, 5), [1, 3], "broadcast"),  # (1, 3, 1, 5)
])
def test_adjustment_value_forms_R13(shape, axis, form):
    axes = axes_of(axis, len(shape))
    cshape = tuple(shape[a] for a in axes)
    r = np.random.default_rng(13)
    scale, bias = r.uniform(0.5, 1.5, cshape), r.uniform(-0.5, 0.5, cshape)
    if form == "scalar":
        scale, bias = np.full(cshape, 1.25), np.full(cshape, -0.5)
        returned = (np.float32(1.25), np.array(-0.5))
    elif form == "python":
        returned = (scale.tolist(), bias.tolist())
    elif form == "channel":
        returned = (scale.astype(np.float32), bias)
        scale = scale.astype(np.float32)
    else:
        returned = (scale.reshape(bshape(shape, axes)), bias.reshape(bshape(shape, axes)))
    layer = BN(axis=axis, adjustment=lambda s: returned, momentum=0.5)
    ref = with_weights(layer, shape)
    x = batches(1, shape, seed=14)[0]
    y_ref, ref = reference_step(x, ref, axis=axis, momentum=0.5, adjust=(scale, bias))
    assert_output(layer(x, training=True), y_ref)
    assert_state(layer, ref)


def test_adjustment_with_mask_R13_R8():
    shape = (6, 4, 3)
    mask = np.random.default_rng(15).random((6, 4)) > 0.3
    adjust = (np.float64([0.5, 1.0, 2.0]), np.float64([0.1, -0.2, 0.3]))
    layer = BN(adjustment=lambda s: adjust, momentum=0.5)
    ref = with_weights(layer, shape)
    x = batches(1, shape, seed=16)[0]
    y_ref, ref = reference_step(x, ref, mask=mask, momentum=0.5, adjust=adjust)
    assert_output(layer(x, training=True, mask=mask), y_ref)
    assert_state(layer, ref)


@pytest.mark.parametrize("returned, error, words", [
    (np.ones(3), TypeError, ["pair", "ndarray"]),
    ((np.ones(3),), TypeError, ["pair", "length 1"]),
    ((np.ones(3), np.zeros(3), np.zeros(3)), TypeError, ["pair", "length 3"]),
    (None, TypeError, ["pair", "NoneType"]),
    ((np.ones((4, 3)), np.zeros(3)), ValueError, ["scale", "(4, 3)", "(3,)"]),
    ((np.ones(3), np.zeros(2)), ValueError, ["bias", "(2,)", "(3,)"]),
    ((np.ones(3), np.zeros(3) + 1j), TypeError, ["bias", "complex"]),
    ((np.ones(3), None), TypeError, ["bias", "object"]),
    ((np.ones(3), "0.1"), TypeError, ["bias"]),
])
def test_adjustment_bad_return_raises_and_changes_nothing_R13_R5_2(returned, error, words):
    layer = BN(adjustment=lambda shape: returned)
    layer.build((4, 3))
    before = snapshot(layer)
    with pytest.raises(error) as info:
        layer(batches(1, (4, 3))[0], training=True)
    for word in words:
        assert word in str(info.value)
    assert_unchanged(layer, before)


def test_adjustment_that_raises_changes_nothing_R13_R5_2():
    def adjustment(shape):
        raise RuntimeError("user adjustment failed")

    layer = BN(adjustment=adjustment)
    layer.build((4, 3))
    before = snapshot(layer)
    with pytest.raises(RuntimeError, match="user adjustment failed"):
        layer(batches(1, (4, 3))[0], training=True)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("adjustment", [1.0, "scale", (np.ones(3), np.zeros(3))])
def test_adjustment_must_be_callable_R1_5(adjustment):
    with pytest.raises(TypeError, match="adjustment"):
        BN(adjustment=adjustment)


# ---------------------------------------------------------------- R1.5 fused


@pytest.mark.parametrize("kwargs, shape", [
    # each combination tf.keras 2 refused with fused=True
    ({"renorm": True}, (4, 3, 2, 5)),
    ({"virtual_batch_size": 2}, (4, 3, 2, 5)),
    ({"adjustment": lambda s: (2.0, 0.5)}, (4, 3, 2, 5)),
    ({"axis": [1, 3]}, (4, 3, 2, 5)),
    ({"axis": 2}, (4, 3, 2, 5)),
    ({}, (4, 5)),                        # rank not 4 or 5
    ({"dtype": "float64"}, (4, 3, 2, 5)),
])
def test_fused_true_never_raises_R1_5(kwargs, shape):
    layer = BN(fused=True, momentum=0.5, **kwargs)
    plain_kwargs = {k: v for k, v in kwargs.items() if k != "dtype"}
    ref = with_weights(layer, shape)
    x = batches(1, shape, seed=17)[0]
    y_ref, ref = reference_step(
        x, ref, axis=plain_kwargs.get("axis", -1), momentum=0.5,
        virtual_batch_size=plain_kwargs.get("virtual_batch_size"),
        renorm=plain_kwargs.get("renorm", False),
        adjust=(2.0, 0.5) if "adjustment" in plain_kwargs else None)
    assert_output(layer(x, training=True), y_ref)
    assert_state(layer, ref)
    assert "fused" not in layer.get_config()


@pytest.mark.parametrize("fused", ["yes", 1, 0.0])
def test_fused_must_be_none_or_bool_R1_5(fused):
    with pytest.raises(TypeError, match=re.escape(repr(fused))):
        BN(fused=fused)
