"""Error rules of cbn.BatchNormalization (behaviour.md R1, R2, R5.2, R7.1, R8.1, R8.5): the right
exception type, a message naming the bad value, and weights + moving statistics unchanged."""

from __future__ import annotations

import re

import cbn
import numpy as np
import pytest
from reference import assert_unchanged, snapshot

BN = cbn.BatchNormalization


def trained_layer(shape=(6, 4, 3), **kwargs):
    """A built layer whose weights are all distinct from their initial values."""
    layer = BN(momentum=0.5, **kwargs)
    x = np.random.default_rng(0).normal(2.0, 3.0, shape).astype(np.float32)
    layer(x, training=True)
    return layer


def shape_re(shape):
    """Shape written as a tuple or a list: (4, 2) or [4, 2]."""
    inner = r",\s*".join(str(s) for s in shape)
    if len(shape) == 1:
        inner += r",?"
    return r"[\(\[]" + inner + r"[\)\]]"


# ---------------------------------------------------------------- R1.1 axis


@pytest.mark.parametrize("axis, needle", [(1.7, "1.7"), ("channels", "channels"),
                                          (None, "None"), (2.0, "2.0")])
def test_axis_bad_type_raises_type_error_naming_value_R1_1(axis, needle):
    with pytest.raises(TypeError, match=re.escape(needle)):
        BN(axis=axis)


@pytest.mark.parametrize("axis, needle", [([1, 2.5], "2.5"), ((1, "c"), "c"), ([None], "None")])
def test_axis_list_with_bad_entry_raises_type_error_R1_1(axis, needle):
    with pytest.raises(TypeError, match=re.escape(needle)):
        BN(axis=axis)


@pytest.mark.parametrize("axis", [[1, 1], (3, 3), [-1, 2, -1]])
def test_axis_duplicates_raise_value_error_R1_1(axis):
    with pytest.raises(ValueError):
        BN(axis=axis)


@pytest.mark.parametrize("axis, shape, wshape", [
    (np.int64(1), (2, 3, 4), (3,)),
    (np.int32(-1), (2, 3, 4), (4,)),
    ([1, 3], (2, 3, 4, 5), (3, 5)),
    ((1, 3), (2, 3, 4, 5), (3, 5)),
    ([np.int64(1), np.int16(3)], (2, 3, 4, 5), (3, 5)),
    ([2], (2, 3, 4), (4,)),
])
def test_axis_accepted_forms_R1_1(axis, shape, wshape):
    layer = BN(axis=axis)
    layer.build(shape)
    assert layer.moving_mean.shape == wshape


# ---------------------------------------------------------------- R1.2 / R1.5 / R1.6 other args


def test_unknown_initializer_name_raises_value_error_R1_2():
    with pytest.raises(ValueError, match="no_such_initializer"):
        BN(gamma_initializer="no_such_initializer")
    with pytest.raises(ValueError, match="glorious_init"):
        BN(moving_variance_initializer="glorious_init")


@pytest.mark.parametrize("value", ["yes", 1, 0, None, np.float32(1.0)])
def test_trainable_must_be_bool_R1_6(value):
    with pytest.raises(ValueError, match=re.escape(str(value))):
        BN(trainable=value)


@pytest.mark.parametrize("value", [True, False])
def test_trainable_bool_accepted_R1_6(value):
    assert BN(trainable=value).trainable is value


@pytest.mark.parametrize("vbs", [0, -2])
def test_virtual_batch_size_must_be_positive_R1_5(vbs):
    with pytest.raises(ValueError, match=re.escape(str(vbs))):
        BN(virtual_batch_size=vbs)


def test_virtual_batch_size_non_int_rejected_R1_5():
    with pytest.raises((TypeError, ValueError), match="2.5"):
        BN(virtual_batch_size=2.5)


def test_virtual_batch_size_with_adjustment_rejected_R1_5():
    def adj(shape):
        return np.ones(shape[-1:]), np.zeros(shape[-1:])

    with pytest.raises(ValueError):
        BN(virtual_batch_size=2, adjustment=adj)


def test_virtual_batch_size_with_axis0_rejected_R1_5():
    with pytest.raises(ValueError):
        layer = BN(axis=0, virtual_batch_size=2)
        layer.build((4, 3))
    with pytest.raises(ValueError):
        layer = BN(axis=[0, 2], virtual_batch_size=2)
        layer.build((4, 3, 2))


@pytest.mark.parametrize("fused", [None, True, False])
def test_fused_accepted_never_raises_R1_5(fused):
    layer = BN(fused=fused)
    x = np.float32([[1.0, 2.0], [3.0, 5.0]])
    y = np.asarray(layer(x, training=True))
    # closed form: per channel mean 2 / 3.5, var 1 / 2.25
    np.testing.assert_allclose(y[:, 0], [-1 / np.sqrt(1.001), 1 / np.sqrt(1.001)], rtol=1e-6)
    np.testing.assert_allclose(y[:, 1], [-1.5 / np.sqrt(2.251), 1.5 / np.sqrt(2.251)], rtol=1e-6)


@pytest.mark.parametrize("dtype", [None, "float32", "float64", "float16", "mixed_float16",
                                   "mixed_bfloat16"])
def test_dtype_policies_accepted_R1_6(dtype):
    layer = BN(dtype=dtype)
    layer.build((2, 3))
    expected = np.float64 if dtype == "float64" else np.float32
    for w in layer.get_weights():
        assert w.dtype == expected


# ---------------------------------------------------------------- R2.1 build


@pytest.mark.parametrize("axis, shape", [(5, (2, 3, 4)), (3, (2, 3, 4)), (-4, (2, 3, 4)),
                                         ([1, 7], (2, 3, 4, 5))])
def test_build_axis_out_of_range_names_axis_and_rank_R2_1(axis, shape):
    layer = BN(axis=axis)
    bad = axis if isinstance(axis, int) else axis[-1]
    with pytest.raises(ValueError) as info:
        layer.build(shape)
    msg = str(info.value)
    assert str(bad) in msg
    assert str(len(shape)) in msg
    assert layer.moving_mean is None


def test_build_duplicate_after_wrapping_R2_1():
    layer = BN(axis=[1, -2])
    with pytest.raises(ValueError):
        layer.build((2, 3, 4))


def test_call_axis_out_of_range_R2_1():
    layer = BN(axis=4)
    with pytest.raises(ValueError, match="4"):
        layer(np.zeros((2, 3), np.float32), training=True)
    assert layer.moving_mean is None


def test_compute_output_shape_validates_axes_R2_4():
    with pytest.raises(ValueError):
        BN(axis=3).compute_output_shape((2, 3, 4))


# ---------------------------------------------------------------- R2.3 later calls


@pytest.mark.parametrize("training", [True, False])
def test_call_with_different_channel_size_R2_3(training):
    layer = trained_layer((6, 4, 3))
    before = snapshot(layer)
    with pytest.raises(ValueError) as info:
        layer(np.ones((6, 4, 7), np.float32), training=training)
    msg = str(info.value)
    assert "3" in msg and "7" in msg  # expected vs received
    assert_unchanged(layer, before)


@pytest.mark.parametrize("shape", [(6, 4), (6, 4, 1, 3), (3,)])
@pytest.mark.parametrize("training", [True, False])
def test_call_with_different_rank_R2_3(shape, training):
    layer = trained_layer((6, 4, 3))
    before = snapshot(layer)
    with pytest.raises(ValueError) as info:
        layer(np.ones(shape, np.float32), training=training)
    msg = str(info.value)
    # expected rank 3; received: the rank or the offending shape
    assert "3" in msg
    assert str(len(shape)) in msg or re.search(shape_re(shape), msg), msg
    assert_unchanged(layer, before)


def test_call_with_different_size_on_one_of_several_axes_R2_3():
    layer = BN(axis=[1, 3])
    layer(np.ones((2, 3, 4, 5), np.float32), training=True)
    before = snapshot(layer)
    with pytest.raises(ValueError):
        layer(np.ones((2, 3, 4, 6), np.float32), training=True)
    with pytest.raises(ValueError):
        layer(np.ones((2, 2, 4, 5), np.float32), training=True)
    assert_unchanged(layer, before)
    # other axes may change (R2.3)
    layer(np.ones((1, 3, 9, 5), np.float32), training=True)


def test_build_then_call_with_other_channels_R2_3():
    layer = BN()
    layer.build((None, 4))
    before = snapshot(layer)
    with pytest.raises(ValueError):
        layer(np.ones((2, 5), np.float32))
    assert_unchanged(layer, before)


# ---------------------------------------------------------------- R2.2 set_weights


@pytest.mark.parametrize("count", [0, 3, 5])
def test_set_weights_wrong_count_R2_2(count):
    layer = trained_layer()
    before = snapshot(layer)
    with pytest.raises(ValueError):
        layer.set_weights([np.ones(3, np.float32)] * count)
    assert_unchanged(layer, before)


@pytest.mark.parametrize("bad_index", [0, 1, 2, 3])
@pytest.mark.parametrize("bad_shape", [(4,), (3, 1, 2), (1, 2), (3, 3)])
def test_set_weights_wrong_shape_changes_nothing_R2_2(bad_index, bad_shape):
    layer = trained_layer()
    before = snapshot(layer)
    new = [np.full(3, 9.0, np.float32) for _ in range(4)]
    new[bad_index] = np.full(bad_shape, 9.0, np.float32)
    with pytest.raises(ValueError):
        layer.set_weights(new)
    assert_unchanged(layer, before)


def test_set_weights_wrong_shape_with_axis_list_R2_2():
    layer = BN(axis=[1, 3])
    layer.build((2, 3, 4, 5))
    before = snapshot(layer)
    with pytest.raises(ValueError):
        layer.set_weights([np.ones((5, 3), np.float32)] * 4)  # transposed: not our shape
    with pytest.raises(ValueError):
        layer.set_weights([np.ones((1, 3, 1, 4), np.float32)] * 4)
    assert_unchanged(layer, before)


# ---------------------------------------------------------------- R8.1 / R8.5 mask shapes


@pytest.mark.parametrize("mshape", [(6, 5), (6,), (6, 4, 3, 1), (6, 2, 3), (6, 4, 2), (2, 1, 1),
                                    (4, 6)])
@pytest.mark.parametrize("training", [True, False])
def test_bad_mask_shape_names_both_shapes_R8_1_R8_5(mshape, training):
    layer = trained_layer((6, 4, 3))
    before = snapshot(layer)
    x = np.ones((6, 4, 3), np.float32)
    with pytest.raises(ValueError) as info:
        layer(x, training=training, mask=np.ones(mshape, bool))
    msg = str(info.value)
    assert re.search(shape_re(mshape), msg), msg
    assert re.search(shape_re((6, 4, 3)), msg), msg
    assert_unchanged(layer, before)


def test_bad_mask_shape_first_call_R8_1():
    layer = BN()
    with pytest.raises(ValueError):
        layer(np.ones((6, 4, 3), np.float32), training=True, mask=np.ones((6, 5), bool))
    if layer.moving_mean is not None:  # a layer built before the check must still be pristine
        np.testing.assert_array_equal(layer.moving_mean, 0.0)
        np.testing.assert_array_equal(layer.moving_variance, 1.0)


# ---------------------------------------------------------------- R7.1 input dtypes


@pytest.mark.parametrize("make, needle", [
    (lambda: np.ones((6, 4, 3), np.complex64), "complex"),
    (lambda: np.ones((6, 4, 3), np.complex128) * (1 + 2j), "complex"),
    (lambda: np.ones((6, 4, 3), object), "object"),
    (lambda: np.full((6, 4, 3), "a"), "<U1|str"),
])
@pytest.mark.parametrize("training", [True, False])
def test_non_real_inputs_raise_type_error_R7_1(make, needle, training):
    layer = trained_layer((6, 4, 3))
    before = snapshot(layer)
    with pytest.raises(TypeError, match=needle):
        layer(make(), training=training)
    assert_unchanged(layer, before)


def test_complex_input_first_call_R7_1():
    with pytest.raises(TypeError):
        BN()(np.ones((2, 3), np.complex128), training=True)


def test_failed_calls_leave_state_as_if_never_made_R5_2():
    # A failing call (bad mask) followed by a good call behaves like just the good call.
    r = np.random.default_rng(5)
    x = r.normal(1.0, 2.0, (8, 3)).astype(np.float32)
    a, b = BN(momentum=0.5), BN(momentum=0.5)
    a.build(x.shape)
    b.build(x.shape)
    with pytest.raises(ValueError):
        a(x, training=True, mask=np.ones((3,), bool))
    with pytest.raises(TypeError):
        a(x.astype(np.complex64), training=True)
    ya, yb = np.asarray(a(x, training=True)), np.asarray(b(x, training=True))
    np.testing.assert_array_equal(ya, yb)
    for wa, wb in zip(a.get_weights(), b.get_weights(), strict=True):
        np.testing.assert_array_equal(wa, wb)
