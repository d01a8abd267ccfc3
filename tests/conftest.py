"""Float64 NumPy reference for the functional-API tests (``cbn.ops``).

Nothing here calls cbn: the tests compare cbn against these formulas (spec R4, R6, R8),
through the session fixture ``ref``.
"""

from __future__ import annotations

import types

import ml_dtypes
import numpy as np
import pytest

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT16 = np.dtype(np.float16)

#: Unit roundoff of the arithmetic cbn uses: float64 for float64 data, float32 otherwise (R7.2).
U32 = 2.0**-24
U64 = 2.0**-53


def channel_axes(axis, rank: int) -> tuple[int, ...]:
    axes = [axis] if isinstance(axis, (int, np.integer)) else list(axis)
    return tuple(sorted(int(a) % rank for a in axes))


def reduction_axes(axes, rank: int) -> tuple[int, ...]:
    return tuple(i for i in range(rank) if i not in axes)


def as_f64(x) -> np.ndarray:
    """The values cbn computes with: floats as they are, integers and bool as float32 (R7.1)."""
    x = np.asarray(x)
    if x.dtype.kind in "iub":
        x = x.astype(np.float32)
    return x.astype(np.float64)


def full_mask(mask, shape) -> np.ndarray:
    """R8.1: (a) input shape minus its last axis gets a trailing axis; (b) broadcastable."""
    if mask is None:
        return np.ones(shape, dtype=bool)
    m = np.asarray(mask)
    if m.ndim == len(shape) - 1:
        m = m[..., np.newaxis]
    return np.broadcast_to(m != 0, shape)


def moments(x, axis, mask=None):
    """R4.1/R8.2/R8.3: per-channel (mean, biased variance, count) in float64, channel shape."""
    x64 = as_f64(x)
    axes = channel_axes(axis, x64.ndim)
    red = reduction_axes(axes, x64.ndim)
    used = full_mask(mask, x64.shape)
    n = used.sum(axis=red, keepdims=True)
    mean = np.where(used, x64, 0.0).sum(axis=red, keepdims=True) / np.maximum(n, 1)
    # A second pass corrects the mean: a plain float64 sum over strided axes is off
    # by up to ~n ulps (a constant 0.37 over 294 positions gave a mean 26 ulps off
    # and a variance of 8e-30 instead of 0).
    mean = mean + np.where(used, x64 - mean, 0.0).sum(axis=red, keepdims=True) / np.maximum(n, 1)
    m2 = np.where(used, (x64 - mean) ** 2, 0.0).sum(axis=red, keepdims=True)
    var = np.where(n > 0, m2 / np.maximum(n, 1), 0.0)
    mean = np.where(n > 0, mean, 0.0)
    cshape = tuple(x64.shape[a] for a in axes)
    return mean.reshape(cshape), var.reshape(cshape), n.reshape(cshape)


def _per_channel(p, default, axes, shape):
    """A channel-shaped (or size-1-padded) parameter, broadcastable against the input."""
    cshape = tuple(shape[a] for a in axes)
    v = np.full(cshape, default) if p is None else np.asarray(p, dtype=np.float64).reshape(cshape)
    return np.expand_dims(v, reduction_axes(axes, len(shape)))


def normalize(x, mean, var, gamma, beta, axis, eps):
    """R6: (x - mean) * gamma / sqrt(var + eps) + beta, float64, the input's shape."""
    x64 = as_f64(x)
    axes = channel_axes(axis, x64.ndim)
    mu, v, g, b = (_per_channel(p, d, axes, x64.shape)
                   for p, d in ((mean, 0.0), (var, 0.0), (gamma, 1.0), (beta, 0.0)))
    return (x64 - mu) * (g / np.sqrt(v + eps)) + b


def ulp16(y, dtype) -> np.ndarray:
    """Spacing of the 16-bit format at |y| (normal or subnormal range)."""
    mant, emin = (10, -14) if np.dtype(dtype) == FLOAT16 else (7, -126)
    a = np.abs(np.asarray(y, dtype=np.float64))
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(a > 0, a, 1.0)))
    e = np.where(a > 0, np.maximum(e, emin), emin)
    return np.exp2(e - mant)


def stats_dtype(x_dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(x_dtype) == np.float64 else np.dtype(np.float32)


def output_dtype(x_dtype) -> np.dtype:
    dt = np.dtype(x_dtype)
    return dt if dt.kind == "f" or dt == BFLOAT16 else np.dtype(np.float32)


def assert_stats_close(mean, var, x, axis, mask=None, rtol=None):
    """Stats vs the float64 reference: dtype, shape, never-negative variance (R4.2),
    exact zeros for channels without a used position (R8.3), and values within
    ``rtol`` (1e-5 for float32 statistics, 1e-12 for float64) of the reference, plus the
    absolute terms explained below."""
    x = np.asarray(x)
    rm, rv, n = moments(x, axis, mask)
    sdt = stats_dtype(x.dtype)
    assert mean.dtype == sdt and var.dtype == sdt, (mean.dtype, var.dtype, sdt)
    assert mean.shape == rm.shape and var.shape == rv.shape, (mean.shape, rm.shape)
    if rtol is None:
        rtol = 1e-12 if sdt == np.float64 else 1e-5
    m64, v64 = mean.astype(np.float64), var.astype(np.float64)
    assert np.all(v64 >= 0), "variance must never be negative (R4.2)"
    assert np.all(m64[n == 0] == 0) and np.all(v64[n == 0] == 0), "empty channel: 0, 0 (R8.3)"
    # Scale of the data around its mean, per channel (over used positions).
    x64 = as_f64(x)
    axes = channel_axes(axis, x64.ndim)
    red = reduction_axes(axes, x64.ndim)
    used = full_mask(mask, x64.shape)
    cshape = rm.shape
    dev = np.abs(x64 - np.expand_dims(rm, red)) if x64.size else np.zeros(x64.shape)
    maxdev = np.where(used, dev, 0.0).max(axis=red, initial=0.0).reshape(cshape)
    amax = np.where(used, np.abs(x64), 0.0).max(axis=red, initial=0.0).reshape(cshape)
    u = U64 if sdt == np.float64 else U32
    tol_m = rtol * (np.abs(rm) + maxdev) + 1e-300
    # Besides rtol: a constant channel may see its float mean's rounding squared, and
    # each merge of partial (count, mean, M2) triples moves M2/N by up to ~2**-52*|mean|*dev
    # (the means are float64 numbers; a masked, threaded call merges many small blocks),
    # which matters only for float64 data far from zero.
    tol_v = rtol * rv + (4 * u * amax) ** 2 + 64 * U64 * np.abs(rm) * maxdev + 1e-300
    np.testing.assert_array_less(np.abs(m64 - rm), tol_m, err_msg="mean (R4.1/R8.2)")
    np.testing.assert_array_less(np.abs(v64 - rv), tol_v, err_msg="variance (R4.1/R8.2)")


def mean_slack(x, mean, var, gamma, axis, eps) -> np.ndarray:
    """Per channel ``|gamma*mean|/sqrt(var+eps)``: how much the output moves per unit of
    relative error in a float64 mean (the reference's own mean has ~2**-53 of it)."""
    x = np.asarray(x)
    axes = channel_axes(axis, x.ndim)
    mu, v, g = (_per_channel(p, d, axes, x.shape) for p, d in ((mean, 0.0), (var, 0.0),
                                                                (gamma, 1.0)))
    return np.abs(g * mu) / np.sqrt(v + eps)


def assert_output_close(y, y_ref, axis, x_dtype, slack=0.0):
    """Output vs the float64 reference: dtype and shape, then per channel
    ``|err| <= k*u*max(1, max|y_ref| over the channel) + k*2**-53*slack``, plus one unit in
    the last place of the 16-bit output for float16/bfloat16. ``u`` is the unit roundoff of
    the compute dtype; ``k`` = 16 for float32 math (statistics within kernels.md's 1e-6
    relative already move y by ~8u; the tighter 4-ulp target is checked per element by the
    accuracy tests) and 64 for float64 math, whose sums of thousands of values err like
    sqrt(n)*u; ``slack`` from :func:`mean_slack` covers the rounding of a float64 mean."""
    odt = output_dtype(x_dtype)
    assert y.dtype == odt, (y.dtype, odt)
    assert y.shape == y_ref.shape, (y.shape, y_ref.shape)
    if y.size == 0:
        return
    axes = channel_axes(axis, y.ndim)
    red = reduction_axes(axes, y.ndim)
    u, k = (U64, 64) if odt == np.float64 else (U32, 16)
    scale = np.maximum(1.0, np.abs(y_ref).max(axis=red, keepdims=True))
    tol = np.broadcast_to(k * u * scale + k * U64 * np.asarray(slack), y.shape)
    if odt in (FLOAT16, BFLOAT16):
        tol = tol + ulp16(y_ref, odt)
    err = np.abs(y.astype(np.float64) - y_ref)
    bad = ~(err <= tol)
    if odt in (FLOAT16, BFLOAT16):
        # Beyond the format's range the correctly rounded output is +-inf.
        with np.errstate(over="ignore"):
            rounded = y_ref.astype(odt)
        bad &= ~(np.isinf(rounded) & np.isfinite(y_ref) & (y == rounded))
    if bad.any():
        i = tuple(np.argwhere(bad)[0])
        raise AssertionError(
            f"{bad.sum()} of {y.size} outputs off; first at {i}: got {y[i]!r}, "
            f"expected {y_ref[i]!r} (|err| {err[i]:.3g} > tol {tol[i]:.3g})"
        )


def assert_normalized(y, x, mean, var, gamma, beta, axis, eps):
    """``y`` is R6's output for input values ``x`` and the given (float64 reference or
    caller's) statistics, within :func:`assert_output_close`'s tolerance."""
    y_ref = normalize(x, mean, var, gamma, beta, axis, eps)
    slack = mean_slack(x, mean, var, gamma, axis, eps)
    assert_output_close(np.asarray(y), y_ref, axis, np.asarray(x).dtype, slack=slack)


@pytest.fixture(scope="session")
def ref():
    """The float64 reference and the comparison helpers, as a namespace."""
    return types.SimpleNamespace(
        moments=moments,
        normalize=normalize,
        full_mask=full_mask,
        as_f64=as_f64,
        channel_axes=channel_axes,
        reduction_axes=reduction_axes,
        stats_dtype=stats_dtype,
        output_dtype=output_dtype,
        assert_stats_close=assert_stats_close,
        assert_output_close=assert_output_close,
        mean_slack=mean_slack,
        assert_normalized=assert_normalized,
        BFLOAT16=BFLOAT16,
    )
