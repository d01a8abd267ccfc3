"""Fuzz test of the public API's argument space: ``cbn.ops`` and ``cbn.BatchNormalization``.

Hypothesis draws every argument from valid values and hostile ones: arrays of every dtype
(integers, bool, complex, object, strings), shapes with zeros, transposed, reversed, strided
and broadcast views, non-arrays; axes out of range, repeated, floats, strings; masks of wrong
shapes and dtypes; odd epsilon and momentum values; ``out=`` buffers of the wrong dtype or
shape, read-only, or overlapping the input. Each drawn argument is known valid, known invalid,
or either (``Arg.valid`` True/False/None). A call may only return or raise TypeError/ValueError:
it must raise when an argument is known invalid, and return results matching the float64
reference (conftest.py, reference.py) when every argument is known valid.
"""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys
from typing import Any

import cbn
import ml_dtypes
import numpy as np
import pytest
import reference
from cbn import ops
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BF16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = [np.dtype(t) for t in (np.float16, np.float32, np.float64)] + [BF16]
INT_DTYPES = [np.dtype(t) for t in (np.int8, np.uint8, np.int64, np.bool_)]
BAD_DTYPES = [np.dtype(t) for t in (np.complex64, np.complex128, object, "U3")]
VIEWS = ["contiguous", "fortran", "reversed", "strided", "transposed", "broadcast"]
ANYTHING = [None, "abc", b"x", 1.5, [[1.0], [2.0, 3.0]], {}, 1j, object()]

# Deterministic (the same examples every run) and bounded: a few seconds per test.
FUZZ = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@dataclasses.dataclass
class Arg:
    value: Any
    valid: bool | None  # known valid, known invalid, or either


def call(fn, *args: Arg, **kwargs: Arg):
    """``fn`` on the values: returns its result, or None after a TypeError/ValueError
    (which a known-invalid argument requires, and known-valid ones forbid); any other
    exception fails the test."""
    every = [*args, *kwargs.values()]
    try:
        result = fn(*(a.value for a in args), **{k: a.value for k, a in kwargs.items()})
    except (TypeError, ValueError) as e:
        assert not all_valid(*every), f"{fn.__name__} rejected valid arguments: {e}"
        return None
    invalid = [a.value for a in every if a.valid is False]
    assert not invalid, f"accepted invalid arguments {invalid!r}"
    return result


def all_valid(*args: Arg) -> bool:
    return all(a.valid is True for a in args)


def make_array(shape, dtype, seed, view) -> np.ndarray:
    rng = np.random.default_rng(seed)
    source_shape = shape[::-1] if view == "transposed" else shape
    if view == "strided":
        source_shape = (*shape[:-1], 2 * shape[-1])
    values = rng.standard_normal(source_shape) * 3 + 1
    if dtype.kind in "iu":
        values = np.clip(np.round(values), 0 if dtype.kind == "u" else -8, 8)
    arr = (values > 1) if dtype == np.bool_ else values.astype(dtype)
    if dtype.kind == "c":
        arr = arr + 1j
    if view == "fortran":
        return np.asfortranarray(arr)
    if view == "reversed":
        return np.flip(arr, axis=0)
    if view == "strided":
        return arr[..., ::2]
    if view == "transposed":
        return arr.T
    if view == "broadcast" and shape[-1] > 0:
        return np.broadcast_to(arr[..., :1], shape)  # read-only, stride 0
    return arr


@st.composite
def inputs(draw, dtypes=FLOAT_DTYPES + INT_DTYPES + BAD_DTYPES):
    """x: mostly arrays of rank 1-4 (valid iff of a real dtype), sometimes no array."""
    if draw(st.integers(0, 9)) == 0:
        value = draw(st.sampled_from([np.float64(2.0), "abc", None, [[1.0], [2.0, 3.0]], 1j]))
        return Arg(value, False)
    shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 5]), min_size=1, max_size=4)))
    dtype = draw(st.sampled_from(dtypes))
    arr = make_array(shape, dtype, draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from(VIEWS)))
    return Arg(arr, dtype not in BAD_DTYPES)


def rank_of(x: Arg) -> int:
    return x.value.ndim if isinstance(x.value, np.ndarray) else 2


@st.composite
def axes(draw, rank: int):
    kind = draw(st.integers(0, 5))
    if kind <= 1:
        return Arg(draw(st.integers(-rank, rank - 1)), True)
    if kind == 2:
        chosen = draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
        signed = [a - rank if draw(st.booleans()) else a for a in chosen]
        return Arg(signed if draw(st.booleans()) else tuple(signed), True)
    if kind == 3:
        return Arg(draw(st.sampled_from([rank, -rank - 1, 10**30, [0, 0], [0, -rank]])), False)
    return Arg(draw(st.sampled_from([1.0, "0", [0.5], b"0", 1j])), False)


@st.composite
def masks(draw, x: Arg):
    if not isinstance(x.value, np.ndarray) or draw(st.integers(0, 2)) == 0:
        return Arg(None, True)
    shape = x.value.shape
    kind = draw(st.integers(0, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if kind <= 1:  # broadcastable, or the shape without the last axis
        mshape = tuple(1 if draw(st.booleans()) else n for n in shape)
        if kind == 1 and len(shape) > 1:
            mshape = shape[:-1]
        dtype = draw(st.sampled_from([np.bool_, np.uint8, np.float32, np.int64]))
        return Arg((rng.random(mshape) < 0.7).astype(dtype), True)
    if kind == 2:  # not broadcastable: a size neither x's nor 1, or one axis too many
        bad = (*shape[:-1], shape[-1] + 2) if draw(st.booleans()) else (*shape, 2)
        return Arg(np.ones(bad, dtype=bool), False)
    if kind == 3:
        return Arg(np.ones(shape, dtype=draw(st.sampled_from(BAD_DTYPES))), False)
    return Arg(draw(st.sampled_from(["abc", 1j, {}])), False)


@st.composite
def epsilons(draw):
    kind = draw(st.integers(0, 3))
    if kind <= 1:
        return Arg(draw(st.sampled_from([1e-3, 0.0, 1e-5, 0.5])), True)
    if kind == 2:
        bad = [-1.0, float("nan"), float("inf"), -float("inf"), "1e-3", None, 10**400, 1j, [1e-3]]
        return Arg(draw(st.sampled_from(bad)), False)
    return Arg(draw(st.sampled_from([True, np.float32(1e-3), 0, 1, -0.0])), None)


@st.composite
def params(draw, x: Arg, axis: Arg, optional: bool, positive: bool = False):
    """A per-channel parameter (mean, variance, gamma, beta) for x's channels."""
    if not (x.valid and axis.valid):
        return Arg(draw(st.sampled_from([None, np.ones(3)])), None)
    cshape = tuple(x.value.shape[a] for a in reference.axes_of(axis.value, x.value.ndim))
    kind = draw(st.integers(0, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    values = rng.standard_normal(cshape)
    if kind == 0 and optional:
        return Arg(None, True)
    if kind <= 2:
        return Arg(np.abs(values) + 0.25 if positive else values, True)
    if kind == 3:
        return Arg(np.ones((*cshape, 2)), False)
    if kind == 4:
        return Arg(values.astype(draw(st.sampled_from(BAD_DTYPES))), False)
    return Arg(draw(st.sampled_from([np.full(cshape, np.nan), values.tolist(), -np.ones(cshape)])),
               None)


def output_dtype(x: np.ndarray) -> np.dtype:
    return x.dtype if x.dtype in FLOAT_DTYPES else np.dtype(np.float32)


@st.composite
def outs(draw, x: Arg):
    """out=: None, a fresh or strided buffer, x itself, or a wrong one."""
    if not isinstance(x.value, np.ndarray) or not x.valid or draw(st.integers(0, 2)) == 0:
        return Arg(None, True)
    arr, dtype = x.value, output_dtype(x.value)
    kind = draw(st.integers(0, 6))
    if kind == 0:
        return Arg(np.empty(arr.shape, dtype), True)
    if kind == 1:
        return Arg(np.empty((*arr.shape[:-1], 2 * arr.shape[-1]), dtype)[..., ::2], True)
    if kind == 2:  # in place: only a writeable float x of its own memory
        return Arg(arr, bool(arr.flags.writeable and arr.dtype == dtype))
    if kind == 3:
        other = np.float64 if dtype != np.float64 else np.float32
        return Arg(np.empty(arr.shape, other), False)
    if kind == 4:
        return Arg(np.empty((*arr.shape, 1), dtype), False)
    if kind == 5:
        readonly = np.empty(arr.shape, dtype)
        readonly.flags.writeable = False
        return Arg(readonly, False)
    # x reversed along an axis of size >= 2: the same memory in another order.
    sizes = [i for i, n in enumerate(arr.shape) if n >= 2]
    if not sizes or not arr.flags.writeable or arr.dtype != dtype:
        return Arg([0.0], False)
    return Arg(np.flip(arr, axis=sizes[0]), False)


def assert_dx_close(dx, dx_ref, dy, x, gamma, axis, mask, eps, mean, variance, training):
    """dx within a few roundings of the terms it is the difference of: per element
    ``|γ|·s·(|dy| + w/N·(Σ|dy| + |x̂|·Σ|dy·x̂|))`` (the last two only in training), in the
    compute precision, plus half a unit in the last place of a 16-bit output."""
    axes = reference.axes_of(axis, x.ndim)
    red = tuple(a for a in range(x.ndim) if a not in axes)
    bs = reference.bshape(x.shape, axes)
    s = 1.0 / np.sqrt(np.asarray(variance, dtype=np.float64).reshape(bs) + eps)
    g = 1.0 if gamma is None else np.abs(np.asarray(gamma, dtype=np.float64)).reshape(bs)
    xhat = np.abs(x - np.asarray(mean, dtype=np.float64).reshape(bs)) * s
    scale = np.abs(dy)
    if training:
        w = reference.mask_weights(mask, x.shape)
        n = np.maximum(w.sum(axis=red, keepdims=True), 1.0)
        abs_dy = np.abs(dy).sum(axis=red, keepdims=True)
        abs_dy_xhat = (np.abs(dy) * xhat).sum(axis=red, keepdims=True)
        scale = scale + w / n * (abs_dy + xhat * abs_dy_xhat)
    u, k = (2.0**-53, 64) if dx.dtype == np.float64 else (2.0**-24, 16)
    tol = k * u * g * s * scale
    if dx.dtype != np.float64 and dx.dtype != np.float32:
        tol = tol + np.abs(dx_ref) * 2.0 ** -(11 if dx.dtype == np.float16 else 8) + 2.0**-24
    err = np.abs(dx.astype(np.float64) - dx_ref)
    worst = np.unravel_index(np.argmax(err - tol), err.shape) if err.size else ()
    assert np.all(err <= tol), f"dx off by {err[worst]:.3g} > {tol[worst]:.3g} at {worst}"


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    yield
    cbn.set_num_threads(0)


@FUZZ
@given(data=st.data())
def test_moments(data, ref):
    x = data.draw(inputs())
    axis, mask = data.draw(axes(rank_of(x))), data.draw(masks(x))
    result = call(ops.moments, x, axis=axis, mask=mask)
    if result is not None and all_valid(x, axis, mask):
        ref.assert_stats_close(*result, x.value, axis.value, mask.value)


@FUZZ
@given(data=st.data())
def test_batch_normalization(data, ref):
    x = data.draw(inputs())
    axis = data.draw(axes(rank_of(x)))
    mean, variance = data.draw(params(x, axis, False)), data.draw(params(x, axis, False, True))
    gamma, beta = data.draw(params(x, axis, True)), data.draw(params(x, axis, True))
    eps, out = data.draw(epsilons()), data.draw(outs(x))
    x_before = np.array(x.value, copy=True) if isinstance(x.value, np.ndarray) else None
    y = call(ops.batch_normalization, x, mean, variance, gamma=gamma, beta=beta, axis=axis,
             epsilon=eps, out=out)
    if y is not None and all_valid(x, axis, mean, variance, gamma, beta, eps, out):
        ref.assert_normalized(y, x_before, mean.value, variance.value, gamma.value, beta.value,
                              axis.value, eps.value)


@FUZZ
@given(data=st.data())
def test_batch_norm_train(data, ref):
    x = data.draw(inputs())
    axis, mask = data.draw(axes(rank_of(x))), data.draw(masks(x))
    gamma, beta = data.draw(params(x, axis, True)), data.draw(params(x, axis, True))
    eps, out = data.draw(epsilons()), data.draw(outs(x))
    x_before = np.array(x.value, copy=True) if isinstance(x.value, np.ndarray) else None
    result = call(ops.batch_norm_train, x, gamma=gamma, beta=beta, axis=axis, epsilon=eps,
                  mask=mask, out=out)
    if result is not None and all_valid(x, axis, mask, gamma, beta, eps, out):
        y, mean, variance = result
        ref.assert_stats_close(mean, variance, x_before, axis.value, mask.value)
        ref.assert_normalized(y, x_before, mean, variance, gamma.value, beta.value, axis.value,
                              eps.value)


@FUZZ
@given(data=st.data())
def test_batch_norm_backward(data, ref):
    x = data.draw(inputs())
    axis, mask = data.draw(axes(rank_of(x))), data.draw(masks(x))
    dy = data.draw(inputs(FLOAT_DTYPES)) if data.draw(st.booleans()) else x
    gamma, eps, out = data.draw(params(x, axis, True)), data.draw(epsilons()), data.draw(outs(x))
    training = data.draw(st.sampled_from([Arg(True, True), Arg(False, True), Arg("yes", None)]))
    if x.valid and axis.valid and mask.valid:  # the statistics a forward would have computed
        stats = ref.moments(x.value, axis.value, mask.value)
        mean, variance = Arg(stats[0], True), Arg(stats[1], True)
    else:
        mean, variance = data.draw(params(x, axis, False)), data.draw(params(x, axis, False, True))
    if dy is not x and isinstance(x.value, np.ndarray):
        same = isinstance(dy.value, np.ndarray) and dy.value.shape == x.value.shape
        dy = Arg(dy.value, None if same else False)
    copies = [np.array(a.value, copy=True) for a in (dy, x) if isinstance(a.value, np.ndarray)]
    result = call(ops.batch_norm_backward, dy, x, mean, variance, gamma=gamma, axis=axis,
                  epsilon=eps, mask=mask, training=training, out=out)
    if result is not None and all_valid(dy, x, axis, mask, gamma, eps, out, training):
        dy_before, x_before = copies
        dx_ref, dgamma_ref, dbeta_ref = reference.backward(
            dy_before.astype(np.float64), ref.as_f64(x_before), gamma.value, axis.value,
            mask.value, eps.value, mean.value, variance.value)
        if not training.value:  # fixed statistics: dx = gamma * dy / sqrt(variance + eps)
            dx_ref = ref.normalize(dy_before, np.zeros_like(variance.value), variance.value,
                                   gamma.value, None, axis.value, eps.value)
        assert result[0].dtype == ref.output_dtype(x_before.dtype)
        assert_dx_close(result[0], dx_ref, dy_before.astype(np.float64), ref.as_f64(x_before),
                        gamma.value, axis.value, mask.value, eps.value, mean.value,
                        variance.value, training.value)


@FUZZ
@given(data=st.data())
def test_layer(data, ref):
    x = data.draw(inputs())
    axis, eps = data.draw(axes(rank_of(x))), data.draw(epsilons())
    momentum = data.draw(st.sampled_from(
        [Arg(0.9, True), Arg(0.0, True), Arg(float("nan"), None), Arg(-1.0, None),
         Arg("0.9", False), Arg(None, False), Arg(10**400, False), Arg(1j, False)]))
    # The constructor does not know the rank: an axis out of range fails at the first call.
    ranked = isinstance(axis.value, (int, list, tuple)) and axis.value != 10**30
    layer = call(cbn.BatchNormalization, axis=Arg(axis.value, None if ranked else axis.valid),
                 momentum=momentum, epsilon=eps)
    if layer is None:
        return
    mask, training = data.draw(masks(x)), data.draw(st.sampled_from([True, False, None]))
    y = call(layer, x, Arg(training, True), mask=mask)
    assert y is None or axis.valid is not False, f"accepted axis {axis.value!r}"
    if y is None or not all_valid(x, axis, mask, eps):
        return
    x32 = np.asarray(x.value).astype(np.float32)  # the layer computes in float32
    if training:
        mean, variance, _ = ref.moments(x32, axis.value, mask.value)
    else:  # the initial moving statistics
        cshape = tuple(x32.shape[a] for a in reference.axes_of(axis.value, x32.ndim))
        mean, variance = np.zeros(cshape), np.ones(cshape)
    ref.assert_normalized(y, x32, mean, variance, None, None, axis.value, eps.value)
    dx = call(layer.backward, Arg(np.ones_like(y), True))
    assert dx is not None and dx.shape == y.shape


@pytest.mark.parametrize("axis", [10**30, -(10**30), 2**31, -(2**31) - 1])
def test_int_axis_beyond_c_int_is_a_value_error(axis):
    """The one-call fast path compared the axis as a C int: 10**30 raised OverflowError."""
    x = np.ones((4, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="axis"):
        ops.batch_norm_train(x, axis=axis)
    with pytest.raises(ValueError, match="axis"):
        ops.batch_normalization(x, np.zeros(3), np.ones(3), axis=axis)


def test_fuzz_seed_corpus_is_what_make_corpus_writes(tmp_path):
    """tests/fuzz/corpus is reproducible by the script its README names."""
    fuzz_dir = pathlib.Path(__file__).resolve().parent / "fuzz"
    subprocess.run([sys.executable, str(fuzz_dir / "make_corpus.py"), str(tmp_path)], check=True)
    written = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_bytes() for p in (fuzz_dir / "corpus").iterdir()}
    assert written == committed
