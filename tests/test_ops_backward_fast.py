"""cbn.ops.batch_norm_backward's small-call fast path: within rounding of the float64 closed
form, the same bits as the general path, and every call it does not take left to the
general path (which validates and explains)."""

from __future__ import annotations

import cbn
import numpy as np
import pytest
from cbn import _core
from test_ops_backward import EPS, backward64, channel_view

FAST_LAYOUTS = [
    pytest.param((2, 3), 1, id="2x3"),
    pytest.param((4, 16, 5, 6), 1, id="NCHW"),
    # At the serial threshold, with more channels than the stack buffer holds.
    pytest.param((4, 8, 8, 128), 3, id="threaded-128-channels"),
]


def make(shape, axis, dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(2.0, 1.5, shape).astype(dtype)
    dy = rng.normal(0.0, 1.0, shape).astype(dtype)
    c = shape[axis]
    gamma = rng.normal(1.0, 0.3, c)
    red = tuple(i for i in range(len(shape)) if i != axis)
    x64 = x.astype(np.float64)
    return x, dy, gamma, x64.mean(red), x64.var(red)


def general(dy, x, mean, var, gamma, axis, training, out=None):
    """The general path: a list axis is never a fast call."""
    return cbn.ops.batch_norm_backward(dy, x, mean, var, gamma=gamma, axis=[axis], epsilon=EPS,
                                       training=training, out=out)


def assert_same_bits(got, expected):
    for a, b in zip(got, expected, strict=True):
        assert (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes())


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape,axis", FAST_LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("with_gamma", [True, False], ids=["gamma", "no-gamma"])
def test_fast_backward_against_float64(with_gamma, training, shape, axis, dtype):
    x, dy, gamma, mean, var = make(shape, axis, dtype, seed=31)
    gamma = gamma if with_gamma else None
    got = _core.backward_fast(dy, x, mean, var, gamma, axis - len(shape), EPS, training)
    assert got is not None, "the call did not take the fast path"
    dx, dgamma, dbeta = got
    g = channel_view(np.ones(shape[axis]) if gamma is None else gamma, shape, (axis,))
    dx_ref, dg_ref, db_ref, _, _ = backward64(dy.astype(np.float64), x.astype(np.float64), g,
                                              (axis,), None, EPS, training)
    u = 2e-15 if dtype == np.float64 else 2e-6
    scale = np.abs(g / np.sqrt(channel_view(var, shape, (axis,)) + EPS)) * (np.abs(dy) + 1)
    assert dx.dtype == dtype and np.all(np.abs(dx - dx_ref) <= 8 * u * scale)
    n = x.size // shape[axis]
    stats_dtype = np.float64 if dtype == np.float64 else np.float32
    for got_sum, ref in ((dgamma, dg_ref), (dbeta, db_ref)):
        assert got_sum.dtype == stats_dtype and got_sum.shape == (shape[axis],)
        np.testing.assert_allclose(got_sum, ref.ravel(), atol=2e-6 * n * np.abs(dy).max())
    assert_same_bits(got, general(dy, x, mean, var, gamma, axis, training))
    # ops takes the fast path for an int axis: the same bits again.
    assert_same_bits(got, cbn.ops.batch_norm_backward(dy, x, mean, var, gamma=gamma, axis=axis,
                                                      epsilon=EPS, training=training))


@pytest.mark.parametrize("target", ["separate", "dy", "x"])
def test_fast_backward_outputs(target):
    """out: a separate array, dy itself or x itself (in place)."""
    x, dy, gamma, mean, var = make((8, 5, 6), 2, np.float32, seed=32)
    expected = general(dy, x, mean, var, gamma, 2, True)
    out = {"separate": np.empty_like(x), "dy": dy, "x": x}[target]
    got = _core.backward_fast(dy, x, mean, var, gamma, 2, EPS, True, out)
    assert got is not None and got[0] is out
    assert_same_bits(got, expected)


def test_fast_backward_leaves_other_calls_to_the_general_path():
    x, dy, gamma, mean, var = make((4, 3), 1, np.float32, seed=33)
    fast = _core.backward_fast
    assert fast(dy, x, mean, var, gamma, 1, EPS, True) is not None
    assert fast(dy, x, mean, var, gamma, [1], EPS, True) is None          # a list axis
    assert fast(dy, x, mean, var, gamma, 1, EPS, 1) is None               # training not a bool
    assert fast(dy, x, mean, var, gamma, 1, 1, True) is None              # epsilon not a float
    assert fast(dy.astype(np.float64), x, mean, var, gamma, 1, EPS, True) is None
    assert fast(dy, x.astype(np.float16), mean, var, gamma, 1, EPS, True) is None
    assert fast(dy, x, None, var, gamma, 1, EPS, True) is None
    assert fast(dy, x, mean, var, gamma[:2], 1, EPS, True) is None
    assert fast(dy, x, mean, var, gamma, 1, EPS, True, activation="relu") is None
    assert fast(dy, x, mean, var, gamma, 1, EPS, True, clip=(0, 1)) is None
    assert fast(dy, x, mean, var, gamma, 1, EPS, True, activation_alpha="a") is None
    shared = np.empty(13, np.float32)
    assert fast(shared[1:13].reshape(4, 3), x, mean, var, gamma, 1, EPS, True,
                out=shared[:12].reshape(4, 3)) is None                   # out overlaps dy


@pytest.mark.parametrize("call,error,match", [
    (lambda x, dy, m, v, g: cbn.ops.batch_norm_backward(dy, x, None, v, axis=1), TypeError,
     "mean and variance are required"),
    (lambda x, dy, m, v, g: cbn.ops.batch_norm_backward(dy, x, m, v, gamma=g[:2], axis=1),
     ValueError, "gamma"),
    (lambda x, dy, m, v, g: cbn.ops.batch_norm_backward(dy[:2], x, m, v, axis=1), ValueError,
     "dy"),
    (lambda x, dy, m, v, g: cbn.ops.batch_norm_backward(dy, x, m, v, axis=1,
                                                        activation_alpha="a"), TypeError,
     "activation_alpha"),
])
def test_bad_calls_still_explain_themselves(call, error, match):
    x, dy, gamma, mean, var = make((4, 3), 1, np.float32, seed=34)
    with pytest.raises(error, match=match):
        call(x, dy, mean, var, gamma)
