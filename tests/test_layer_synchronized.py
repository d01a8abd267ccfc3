"""BatchNormalization(synchronized=True) (spec R14) with ranks as threads
(cbn.distributed.ThreadGroup), against float64 NumPy on the concatenated batch."""

from __future__ import annotations

import threading

import cbn
import numpy as np
import pytest
from cbn.distributed import ThreadGroup, get_default_allreduce, set_default_allreduce

EPS = 1e-3
MOMENTUM = 0.9


class Counting:
    """An allreduce that counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, buf):
        self.calls += 1
        return self.fn(buf)


def run_ranks(world, work):
    """work(rank, allreduce) on `world` threads; returns their results in rank order."""
    group = ThreadGroup(world, timeout=30)
    results, errors = [None] * world, []

    def target(rank):
        try:
            results[rank] = work(rank, group[rank])
        except BaseException as err:  # reported below
            errors.append(err)
            group.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def reference(x, dy, mask, gamma, beta):
    """Single-process float64 forward and backward on the full (B, ..., C) batch."""
    w = np.ones(x.shape[:-1] + (1,)) if mask is None else mask[..., None].astype(float)
    red = tuple(range(x.ndim - 1))
    n = w.sum(red)
    mean = (w * x).sum(red) / n
    var = (w * (x - mean) ** 2).sum(red) / n
    s = 1 / np.sqrt(var + EPS)
    xhat = (x - mean) * s
    y = xhat * gamma + beta
    sum_dy, sum_dy_xhat = dy.sum(red), (dy * xhat).sum(red)
    dx = gamma * s * (dy - w / n * (sum_dy + xhat * sum_dy_xhat))
    return mean, var, y, dx


@pytest.mark.parametrize("sizes", [(4, 4), (3, 6, 1), (5, 0), (2, 7, 0, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_global_statistics_forward_and_backward(sizes, masked):
    """R14.2/R14.3: every rank normalizes with the statistics of all ranks' used
    positions (uneven and empty ranks too) and makes one collective per forward and
    per backward; dγ, dβ are each rank's own."""
    rng = np.random.default_rng(sum(sizes) + masked)
    world, total = len(sizes), sum(sizes)
    x = rng.normal(40.0, 3.0, (total, 5, 6)).astype(np.float32)
    dy = rng.normal(0.0, 1.0, x.shape).astype(np.float32)
    mask = rng.random((total, 5)) > 0.3 if masked else None
    gamma, beta = rng.normal(1.0, 0.2, 6), rng.normal(0.0, 0.2, 6)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mean, var, y_ref, dx_ref = reference(x64, dy64, mask, gamma, beta)
    bounds = np.cumsum((0,) + sizes)

    def work(rank, member):
        lo, hi = bounds[rank], bounds[rank + 1]
        counting = Counting(member)
        layer = cbn.BatchNormalization(synchronized=True, allreduce=counting, epsilon=EPS,
                                       momentum=MOMENTUM)
        layer.build((None, 5, 6))
        layer.gamma[...] = gamma
        layer.beta[...] = beta
        y = layer(x[lo:hi], training=True, mask=None if mask is None else mask[lo:hi])
        after_forward = counting.calls
        dx = layer.backward(dy[lo:hi])
        grads = [g.copy() for g in layer.gradients]
        after_backward = counting.calls
        moving = layer.moving_mean.copy(), layer.moving_variance.copy()
        layer(x[lo:hi], training=False)  # inference and its backward never communicate
        layer.backward(dy[lo:hi])
        return y, dx, *moving, grads, (after_forward, after_backward, counting.calls)

    for rank, (y, dx, mm, mv, grads, calls) in enumerate(run_ranks(world, work)):
        lo, hi = bounds[rank], bounds[rank + 1]
        assert calls == (1, 2, 2)
        np.testing.assert_allclose(mm, MOMENTUM * 0 + (1 - MOMENTUM) * mean, rtol=1e-6)
        np.testing.assert_allclose(mv, MOMENTUM * 1 + (1 - MOMENTUM) * var, rtol=1e-6)
        np.testing.assert_allclose(y, y_ref[lo:hi], rtol=0, atol=2e-5)
        np.testing.assert_allclose(dx, dx_ref[lo:hi], rtol=0, atol=5e-5)
        xhat = (x64[lo:hi] - mean) / np.sqrt(var + EPS)
        np.testing.assert_allclose(grads[0], (dy64[lo:hi] * xhat).sum((0, 1)), rtol=2e-5,
                                   atol=2e-4)
        np.testing.assert_allclose(grads[1], dy64[lo:hi].sum((0, 1)), rtol=2e-5, atol=2e-4)


def test_missing_callback_is_a_value_error_and_changes_nothing():
    """R14.1: no allreduce and no process default → ValueError at the first training
    call, saying how to set one; inference works without one."""
    assert get_default_allreduce() is None
    layer = cbn.BatchNormalization(synchronized=True)
    x = np.ones((4, 3), np.float32)
    layer(x)  # inference: no callback needed
    before = [w.copy() for w in layer.weights]
    with pytest.raises(ValueError, match="set_default_allreduce"):
        layer(x, training=True)
    for w, b in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(w, b)


def test_process_default_is_used():
    calls = Counting(lambda buf: None)  # one rank: the sum is the buffer itself
    set_default_allreduce(calls)
    try:
        layer = cbn.BatchNormalization(synchronized=True)
        x = np.random.default_rng(0).normal(3.0, 2.0, (16, 4)).astype(np.float32)
        y = layer(x, training=True)
    finally:
        set_default_allreduce(None)
    assert calls.calls == 1
    x64 = x.astype(np.float64)
    expected = (x64 - x64.mean(0)) / np.sqrt(x64.var(0) + 1e-3)
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_raising_callback_leaves_state_unchanged():
    """R14.4."""
    def failing(buf):
        raise ConnectionError("rank 3 is gone")

    layer = cbn.BatchNormalization(synchronized=True, allreduce=failing)
    x = np.random.default_rng(1).normal(size=(8, 3)).astype(np.float32)
    layer.build(x.shape)
    before = [w.copy() for w in layer.weights]
    with pytest.raises(ConnectionError, match="rank 3"):
        layer(x, training=True)
    for w, b in zip(layer.weights, before, strict=True):
        np.testing.assert_array_equal(w, b)


def test_large_mean_relative_to_spread():
    """distributed.md: the shift K (the moving mean) keeps the merge exact once the
    moving mean is near the batch mean, at mean/std = 1e4 in float32."""
    rng = np.random.default_rng(2)
    x = (1e4 + rng.normal(0.0, 1.0, (12, 4))).astype(np.float32)
    x64 = x.astype(np.float64)

    def work(rank, member):
        layer = cbn.BatchNormalization(synchronized=True, allreduce=member, momentum=0.0)
        layer.build((None, 4))
        layer.moving_mean[...] = 1e4
        part = x[rank * 6:(rank + 1) * 6]
        layer(part, training=True)
        return layer.moving_variance.copy()

    for var in run_ranks(2, work):
        np.testing.assert_allclose(var, x64.var(0), rtol=1e-5)
