"""The float64 reference of one training call with tf.keras 2's extras (behaviour.md R11-R13:
renorm, ghost batch normalization, adjustment), written from the rules themselves, and the layer
state helpers the tests of those extras share."""

from __future__ import annotations

import numpy as np
from reference import axes_of, bshape, mask_weights, moments, to64

NAMES = ("gamma", "beta", "moving_mean", "moving_variance", "moving_stddev", "renorm_mean",
         "renorm_stddev")


def reference_step(x, state, *, axis=-1, virtual_batch_size=None, mask=None, momentum=0.99,
                   eps=1e-3, renorm=False, renorm_momentum=0.99, clipping=None, adjust=None):
    """One training call written from R4-R6, R8, R11-R13 in float64.

    Ghost batch g holds the samples b with b mod (B/V) = g: ``x[g::B/V]`` (R12). Each is
    normalized with its own (masked) moments; the moving and renorm updates and renorm's r, d
    use the averages over ghost batches of their means and of their variances. ``adjust`` is
    ``(a_scale, a_bias)`` broadcastable to the channel shape (R13). ``state`` maps weight names
    to float64 arrays (gamma/beta may be missing). Returns ``(y, new_state)``.
    """
    x64 = to64(x)
    axes = axes_of(axis, x64.ndim)
    bs = bshape(x64.shape, axes)
    cshape = tuple(x64.shape[a] for a in axes)
    ghosts = 1 if virtual_batch_size is None else x64.shape[0] // virtual_batch_size
    used = mask_weights(mask, x64.shape)
    per_ghost = [moments(x64[g::ghosts], axis, used[g::ghosts]) for g in range(ghosts)]
    mean = np.mean([m for m, _ in per_ghost], axis=0)
    var = np.mean([v for _, v in per_ghost], axis=0)
    stddev = np.sqrt(var + eps)
    r, d = np.ones(cshape), np.zeros(cshape)
    if renorm:
        clipping = clipping or {}
        renorm_stddev = np.maximum(state["renorm_stddev"], np.sqrt(eps))
        r = stddev / renorm_stddev
        d = (mean - state["renorm_mean"]) / renorm_stddev
        r = np.clip(r, clipping.get("rmin", -np.inf), clipping.get("rmax", np.inf))
        d = np.clip(d, -clipping.get("dmax", np.inf), clipping.get("dmax", np.inf))
    a_scale, a_bias = adjust if adjust is not None else (1.0, 0.0)

    def per_channel(v, default=None):
        v = default if v is None else v
        return np.broadcast_to(np.asarray(v, np.float64), cshape).reshape(bs)

    gamma, beta = per_channel(state.get("gamma"), 1.0), per_channel(state.get("beta"), 0.0)
    y = np.empty(x64.shape)
    for g, (mean_g, var_g) in enumerate(per_ghost):
        xhat = (x64[g::ghosts] - mean_g.reshape(bs)) / np.sqrt(var_g.reshape(bs) + eps)
        corrected = xhat * per_channel(r) + per_channel(d)
        y[g::ghosts] = (corrected * per_channel(a_scale) + per_channel(a_bias)) * gamma + beta

    new = dict(state)
    new["moving_mean"] = state["moving_mean"] * momentum + mean * (1 - momentum)
    if renorm:
        new["moving_stddev"] = state["moving_stddev"] * momentum + stddev * (1 - momentum)
        new["moving_variance"] = np.maximum(new["moving_stddev"] ** 2 - eps, 0.0)
        new["renorm_mean"] = state["renorm_mean"] * renorm_momentum + mean * (1 - renorm_momentum)
        new["renorm_stddev"] = (state["renorm_stddev"] * renorm_momentum
                                + stddev * (1 - renorm_momentum))
    else:
        new["moving_variance"] = state["moving_variance"] * momentum + var * (1 - momentum)
    return y, new


def state_of(layer):
    return {n: np.asarray(getattr(layer, n), np.float64) for n in NAMES
            if getattr(layer, n) is not None}


def assert_state(layer, ref, rtol=2e-6, atol=2e-6):
    got = state_of(layer)
    assert sorted(got) == sorted(ref)
    for n in got:
        np.testing.assert_allclose(got[n], ref[n], rtol=rtol, atol=atol, err_msg=n)


def assert_output(y, y_ref, tol=2e-6):
    y = np.asarray(y, np.float64)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=tol, atol=tol * max(1.0, np.abs(y_ref).max()))


def batches(n, shape, seed=0):
    r = np.random.default_rng(seed)
    return [(r.normal(0.0, 1.0, shape) * (1.0 + k) + 2.0 * k - 1.0).astype(np.float32)
            for k in range(n)]


def with_weights(layer, shape, seed=1):
    """Build ``layer`` for ``shape`` and give gamma and beta distinct values."""
    layer.build(shape)
    r = np.random.default_rng(seed)
    ws = layer.get_weights()
    ws[0] = r.uniform(0.5, 2.0, ws[0].shape).astype(ws[0].dtype)
    ws[1] = r.uniform(-1.0, 1.0, ws[1].shape).astype(ws[1].dtype)
    layer.set_weights(ws)
    return state_of(layer)
