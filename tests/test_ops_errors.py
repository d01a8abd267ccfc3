"""Every argument error of ``cbn.ops``: the exception type, a message that names the bad
value, and no side effect (an ``out=`` buffer is left unchanged)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from cbn import ops

X = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
C4 = np.ones(4)


def train(x=X, **kw):
    return ops.batch_norm_train(x, **kw)


def infer(x=X, **kw):
    kw.setdefault("mean", np.zeros(4))
    kw.setdefault("variance", np.ones(4))
    mean, var = kw.pop("mean"), kw.pop("variance")
    return ops.batch_normalization(x, mean, var, **kw)


def moments(x=X, **kw):
    return ops.moments(x, **kw)


ALL_OPS = [pytest.param(f, id=f.__name__) for f in (moments, train, infer)]
OUT_OPS = [pytest.param(f, id=f.__name__) for f in (train, infer)]


# ---------------------------------------------------------------------------- axis (R1.1, R2.1)


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("axis", [1.0, 1.7, "1", None, [1, 2.0], (0, "x"), b"\x01"])
def test_axis_of_wrong_type_is_a_type_error_naming_it(op, axis):
    # R1.1: floats, strings, None -> TypeError naming the value (no silent int() coercion).
    bad = axis if not isinstance(axis, (list, tuple)) else next(
        a for a in axis if not isinstance(a, int))
    with pytest.raises(TypeError, match=re.escape(repr(bad))):
        op(axis=axis)


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("axis", [3, -4, 10, [0, 3], (-4,)])
def test_axis_out_of_range_names_axis_and_rank(op, axis):
    # R2.1: out of range -> ValueError naming the axis and the rank (not a bare IndexError).
    with pytest.raises(ValueError) as info:
        op(axis=axis)
    msg = str(info.value)
    bad = axis if isinstance(axis, int) else next(a for a in axis if not -3 <= a < 3)
    assert str(bad) in msg and "rank 3" in msg, msg


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("axis", [[1, 1], (2, -1), [0, -3]])
def test_duplicate_axes_are_a_value_error(op, axis):
    # R1.1 / R2.1: duplicates, also after wrapping negative axes -> ValueError.
    with pytest.raises(ValueError, match="(?i)duplicate|twice|same axis"):
        op(axis=axis)


@pytest.mark.parametrize("op", ALL_OPS)
def test_empty_axis_list_is_a_value_error(op):
    with pytest.raises(ValueError, match="axis"):
        op(axis=[])


def test_numpy_integer_axes_are_accepted():
    # R1.1: "an int (Python or NumPy integer)".
    mean, var = ops.moments(X, axis=np.int32(1))
    np.testing.assert_allclose(mean, X.astype(np.float64).mean(axis=(0, 2)), rtol=1e-6)
    mean, var = ops.moments(X, axis=[np.int64(0), np.int8(-1)])
    assert mean.shape == (2, 4)


# ---------------------------------------------------------------------------- inputs (R7.1)


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize("x", [np.float32(3.0), np.array(2.0), 5.0])
def test_scalar_input_is_rejected(op, x):
    with pytest.raises(ValueError, match="scalar"):
        op(x=x)


@pytest.mark.parametrize("op", ALL_OPS)
@pytest.mark.parametrize(
    "x",
    [
        np.ones((2, 4), dtype=np.complex64),
        np.ones((2, 4), dtype=np.complex128),
        np.full((2, 4), 1.0, dtype=object),
        np.full((2, 4), "a"),
        np.full((2, 4), b"a"),
        np.zeros((2, 4), dtype="datetime64[s]"),
    ],
    ids=["complex64", "complex128", "object", "str", "bytes", "datetime64"],
)
def test_unsupported_dtypes_are_a_type_error(op, x):
    # R7.1: complex, object, strings -> TypeError naming the dtype (no silent real part).
    with pytest.raises(TypeError, match=re.escape(str(x.dtype))):
        op(x=x)


# ---------------------------------------------------------------------------- masks (R8.1)


MASK_OPS = [pytest.param(moments, id="moments"), pytest.param(train, id="train")]


@pytest.mark.parametrize("op", MASK_OPS)
@pytest.mark.parametrize("mshape", [(3,), (2, 3, 4, 1), (2, 4), (3, 3, 4), (2, 2), (4, 3, 2), ()])
def test_bad_mask_shape_names_both_shapes(op, mshape):
    # R8.1: any shape other than (a) input minus last axis or (b) broadcastable -> ValueError.
    mask = np.ones(mshape, dtype=bool)
    with pytest.raises(ValueError) as info:
        op(mask=mask)
    msg = str(info.value)
    assert str(mshape) in msg and str(X.shape) in msg, msg


@pytest.mark.parametrize("mshape", [(2, 3), (2, 3, 4), (1, 3, 1), (1, 1, 1), (2, 1)])
def test_good_mask_shapes_are_accepted(mshape):
    # R8.1 (a) and (b), for contrast with the rejected shapes above.
    mean, var = ops.moments(X, mask=np.ones(mshape, dtype=np.uint8))
    np.testing.assert_allclose(mean, X.astype(np.float64).mean(axis=(0, 1)), rtol=1e-6)


def test_mask_of_complex_dtype_is_a_type_error():
    with pytest.raises(TypeError, match="complex"):
        ops.moments(X, mask=np.ones((2, 3), dtype=np.complex64))


# ---------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("name", ["gamma", "beta"])
@pytest.mark.parametrize("op", OUT_OPS)
@pytest.mark.parametrize("shape", [(3,), (5,), (4, 2), (2, 1, 4)])
def test_parameter_shape_mismatch(op, name, shape):
    # Parameters have the channel shape (R2.2), possibly padded with size-1 dims.
    with pytest.raises(ValueError) as info:
        op(**{name: np.ones(shape)})
    msg = str(info.value)
    assert name in msg and str(shape) in msg and "(4,)" in msg, msg


@pytest.mark.parametrize("name", ["mean", "variance"])
def test_statistics_shape_mismatch(name):
    with pytest.raises(ValueError, match=rf"{name}.*\(3,\).*\(4,\)"):
        infer(**{name: np.ones(3)})


@pytest.mark.parametrize("name", ["mean", "variance"])
def test_missing_statistics(name):
    with pytest.raises(TypeError, match="None"):
        infer(**{name: None})
    with pytest.raises(TypeError):
        ops.batch_normalization(X, np.zeros(4))  # variance not given at all


def test_parameters_of_complex_dtype_are_a_type_error():
    with pytest.raises(TypeError, match="complex"):
        train(gamma=np.ones(4, dtype=np.complex128))


@pytest.mark.parametrize("op", OUT_OPS)
@pytest.mark.parametrize("eps", [-1e-3, float("nan"), float("inf"), -0.5])
def test_bad_epsilon_is_a_value_error(op, eps):
    with pytest.raises(ValueError, match="epsilon"):
        op(epsilon=eps)


@pytest.mark.parametrize("op", OUT_OPS)
@pytest.mark.parametrize("eps", ["0.001", None, True, [1e-3]])
def test_epsilon_of_wrong_type_is_a_type_error(op, eps):
    with pytest.raises(TypeError, match="epsilon"):
        op(epsilon=eps)


# ---------------------------------------------------------------------------- out=


def sentinel(shape=X.shape, dtype=np.float32):
    return np.full(shape, -7.5, dtype=dtype)


@pytest.mark.parametrize("op", OUT_OPS)
@pytest.mark.parametrize(
    "out, exc, pattern",
    [
        (sentinel((2, 3, 5)), ValueError, r"\(2, 3, 5\).*\(2, 3, 4\)"),
        (sentinel((24,)), ValueError, r"\(24,\)"),
        (sentinel(dtype=np.float64), TypeError, "float64.*float32"),
        (sentinel(dtype=np.float16), TypeError, "float16"),
        (sentinel(dtype=np.int32), TypeError, "int32"),
    ],
    ids=["shape", "flat", "float64", "float16", "int32"],
)
def test_bad_out_is_rejected_and_left_unchanged(op, out, exc, pattern):
    before = out.copy()
    with pytest.raises(exc, match=pattern):
        op(out=out)
    np.testing.assert_array_equal(out, before)


@pytest.mark.parametrize("op", OUT_OPS)
def test_read_only_out(op):
    out = sentinel()
    out.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        op(out=out)
    np.testing.assert_array_equal(out, sentinel())


@pytest.mark.parametrize("op", OUT_OPS)
def test_in_place_on_a_read_only_input(op):
    # A read-only input (e.g. np.broadcast_to) cannot be its own output.
    x = np.broadcast_to(np.arange(4, dtype=np.float32), (3, 4))
    with pytest.raises(ValueError, match="read-only"):
        op(x=x, out=x)


@pytest.mark.parametrize("op", OUT_OPS)
@pytest.mark.parametrize("how", ["shifted", "reversed", "strided-alias"])
def test_partially_overlapping_out(op, how):
    # out must be the input itself (in place) or not overlap it: a partial overlap would
    # let the kernel read values it already overwrote.
    buf = np.arange(60, dtype=np.float32).reshape(15, 4)
    if how == "shifted":
        x, out = buf[:12], buf[3:]
    elif how == "reversed":
        x, out = buf[:12], buf[:12][::-1]
    else:
        x, out = buf[0:12:2], buf[0:6]  # rows 0, 2, 4 are in both, with other strides
    saved = buf.copy()
    with pytest.raises(ValueError, match="overlap"):
        op(x=x, out=out)
    np.testing.assert_array_equal(buf, saved)


@pytest.mark.parametrize("op", OUT_OPS)
def test_out_errors_come_before_any_write_with_other_bad_arguments(op):
    # A call that fails on another argument does not write into out either.
    out = sentinel()
    with pytest.raises(ValueError):
        op(out=out, gamma=np.ones(3))
    with pytest.raises(ValueError):
        op(out=out, epsilon=-1.0)
    with pytest.raises(TypeError):
        op(out=out, axis=1.5)
    if op is train:
        with pytest.raises(ValueError):
            op(out=out, mask=np.ones((5,), dtype=bool))
    np.testing.assert_array_equal(out, sentinel())


def test_int_input_needs_float32_out():
    # R7.1: integer input computes (and outputs) float32, so out= must be float32.
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    with pytest.raises(TypeError, match="float32"):
        ops.batch_norm_train(x, out=x)
    y, _, _ = ops.batch_norm_train(x, out=np.empty((3, 4), np.float32))
    assert y.dtype == np.float32
