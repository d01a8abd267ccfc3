"""Float64 NumPy reference of batch normalization, written from behaviour.md (R4, R6, R8, R11).

Shared by the layer tests. Independent of cbn: plain NumPy only.
"""

from __future__ import annotations

import numpy as np


def axes_of(axis, ndim):
    """Sorted non-negative channel axes (R2.1)."""
    axes = [axis] if isinstance(axis, (int, np.integer)) else list(axis)
    return tuple(sorted(int(a) % ndim for a in axes))


def channel_shape(shape, axes):
    """Weight shape: sizes of the normalized axes in increasing axis order (R2.2)."""
    return tuple(int(shape[a]) for a in axes)


def bshape(shape, axes):
    """Shape that broadcasts a channel-shaped array against the input."""
    return tuple(int(shape[a]) if a in axes else 1 for a in range(len(shape)))


def to64(x):
    return np.asarray(x).astype(np.float64)


def mask_weights(mask, shape):
    """R8.1: a rank-1 mask gets a trailing size-1 axis, then broadcasts. Non-zero = used."""
    if mask is None:
        return np.ones(shape, dtype=np.float64)
    m = np.asarray(mask)
    if m.ndim == len(shape) - 1:
        m = m[..., None]
    return np.broadcast_to((m != 0).astype(np.float64), shape)


def moments(x, axis=-1, mask=None):
    """R4.1 / R8.2 / R8.3: per-channel mean and biased variance (float64, channel shape).

    A channel with no used position gets mean 0 and variance 0.
    """
    x = to64(x)
    axes = axes_of(axis, x.ndim)
    red = tuple(a for a in range(x.ndim) if a not in axes)
    w = mask_weights(mask, x.shape)
    n = w.sum(axis=red, keepdims=True)
    safe = np.where(n > 0, n, 1.0)
    xw = np.where(w > 0, x, 0.0)
    mean = np.where(n > 0, xw.sum(axis=red, keepdims=True) / safe, 0.0)
    dev = np.where(w > 0, x - mean, 0.0)
    var = np.where(n > 0, (dev * dev).sum(axis=red, keepdims=True) / safe, 0.0)
    cs = channel_shape(x.shape, axes)
    return mean.reshape(cs), var.reshape(cs)


def normalize(x, mean, var, gamma=None, beta=None, axis=-1, eps=1e-3):
    """R6: (x - mean) * gamma / sqrt(var + eps) + beta, in float64."""
    x = to64(x)
    axes = axes_of(axis, x.ndim)
    bs = bshape(x.shape, axes)
    g = 1.0 if gamma is None else to64(gamma).reshape(bs)
    b = 0.0 if beta is None else to64(beta).reshape(bs)
    return (x - to64(mean).reshape(bs)) * g / np.sqrt(to64(var).reshape(bs) + eps) + b


def train_step(x, state, momentum=0.99, eps=1e-3, axis=-1, mask=None):
    """One training call (R4, R5, R6). ``state``: dict with gamma, beta (or None), moving_mean,
    moving_variance (float64). Returns (y, new_state, mean, var)."""
    mean, var = moments(x, axis, mask)
    y = normalize(x, mean, var, state.get("gamma"), state.get("beta"), axis, eps)
    new = dict(state)
    new["moving_mean"] = to64(state["moving_mean"]) * momentum + mean * (1.0 - momentum)
    new["moving_variance"] = to64(state["moving_variance"]) * momentum + var * (1.0 - momentum)
    return y, new, mean, var


def renorm_step(x, state, momentum=0.99, renorm_momentum=0.99, eps=1e-3, clipping=None, axis=-1,
                mask=None):
    """One batch-renormalization training call (R11). ``state`` holds gamma, beta, moving_mean,
    moving_variance, moving_stddev, renorm_mean, renorm_stddev. Returns (y, new_state)."""
    clipping = clipping or {}
    x64 = to64(x)
    axes = axes_of(axis, x64.ndim)
    bs = bshape(x64.shape, axes)
    mean, var = moments(x64, axis, mask)
    s = np.sqrt(var + eps)
    rs = np.maximum(to64(state["renorm_stddev"]), np.sqrt(eps))
    r = s / rs
    d = (mean - to64(state["renorm_mean"])) / rs
    if "rmin" in clipping and clipping["rmin"] is not None:
        r = np.maximum(r, clipping["rmin"])
    if "rmax" in clipping and clipping["rmax"] is not None:
        r = np.minimum(r, clipping["rmax"])
    if "dmax" in clipping and clipping["dmax"] is not None:
        d = np.clip(d, -clipping["dmax"], clipping["dmax"])
    g = 1.0 if state.get("gamma") is None else to64(state["gamma"]).reshape(bs)
    b = 0.0 if state.get("beta") is None else to64(state["beta"]).reshape(bs)
    xhat = (x64 - mean.reshape(bs)) / s.reshape(bs)
    y = (xhat * r.reshape(bs) + d.reshape(bs)) * g + b
    new = dict(state)
    rm = renorm_momentum
    new["renorm_mean"] = to64(state["renorm_mean"]) * rm + mean * (1 - rm)
    new["renorm_stddev"] = to64(state["renorm_stddev"]) * rm + s * (1 - rm)
    new["moving_mean"] = to64(state["moving_mean"]) * momentum + mean * (1 - momentum)
    new["moving_stddev"] = to64(state["moving_stddev"]) * momentum + s * (1 - momentum)
    new["moving_variance"] = np.maximum(new["moving_stddev"] ** 2 - eps, 0.0)
    return y, new


def snapshot(layer):
    """Copies of every weight, for 'nothing changed' checks (R2.2, R5.2)."""
    return [np.array(w, copy=True) for w in layer.get_weights()]


def assert_unchanged(layer, before):
    after = layer.get_weights()
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def backward(dy, x, gamma=None, axis=-1, mask=None, eps=1e-3, mean=None, variance=None):
    """R15 for a training call: ``(dx, dgamma, dbeta)`` in float64 by the closed form
    ``dx = γ·s·(dy − w/N·(Σdy + x̂·Σdy·x̂))`` through the (masked) batch statistics of
    ``x`` (``s = 1/√(σ² + eps)``, ``w`` the mask, ``N`` the used count; no statistics
    term where ``N = 0``), ``dgamma = Σdy·x̂`` and ``dbeta = Σdy``, sums over every
    position, masked ones too. ``mean``/``variance`` (channel shape) are the values the
    forward normalized with, if not the exact statistics of ``x`` (say, rounded to
    float32): x̂ uses them."""
    x, dy = to64(x), to64(dy)
    axes = axes_of(axis, x.ndim)
    red = tuple(a for a in range(x.ndim) if a not in axes)
    bs = bshape(x.shape, axes)
    if mean is None or variance is None:
        mean, variance = moments(x, axis, mask)
    w = mask_weights(mask, x.shape)
    n = w.sum(axis=red, keepdims=True)
    s = 1.0 / np.sqrt(to64(variance).reshape(bs) + eps)
    g = 1.0 if gamma is None else to64(gamma).reshape(bs)
    xhat = (x - to64(mean).reshape(bs)) * s
    sum_dy = dy.sum(axis=red, keepdims=True)
    sum_dy_xhat = (dy * xhat).sum(axis=red, keepdims=True)
    through_stats = w / np.maximum(n, 1.0) * (sum_dy + xhat * sum_dy_xhat)
    dx = g * s * (dy - through_stats)
    cs = channel_shape(x.shape, axes)
    return dx, sum_dy_xhat.reshape(cs), sum_dy.reshape(cs)


def numeric_grad(loss, x, h=1e-6):
    """Central differences of the scalar ``loss(x)`` with respect to every entry of x."""
    g = np.empty_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (loss(xp) - loss(xm)) / (2 * h)
    return g
