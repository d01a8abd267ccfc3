"""pytest-benchmark suite for cbn: ``pytest bench/ --benchmark-only``.

cbn alone (the peers are in ``compare.py``): inference in place, into ``out=`` and
into a fresh array, training forward and backward into ``out=``, for a few shapes and
layouts at 1 thread and at every core; the per-call overhead on a tiny input; and the
compiled ``a·x + b`` and ``a·x + b·y`` sweeps (the memory-bound limits) on the same
arrays. Each test checks its result once for sanity; none asserts on timings.
"""

from __future__ import annotations

import os

import cbn
import numpy as np
import pytest
from cbnbench.cases import CASES, EPSILON, TINY, CaseData, make_data
from cbnbench.sweep import SweepUnavailable, build_sweep

SHAPES = ("32x56x56x64", "32x64x56x56", "256x1024", "32x224x224x3")
BENCH_CASES = [c for c in CASES if c.name in SHAPES]
THREADS = sorted({1, os.cpu_count() or 1})


@pytest.fixture(scope="module", params=BENCH_CASES, ids=lambda c: f"{c.name}-{c.layout}")
def data(request) -> CaseData:
    return make_data(request.param)


@pytest.fixture(params=THREADS, ids=lambda n: f"{n}thr")
def threads(request):
    cbn.set_num_threads(request.param)
    yield request.param
    cbn.set_num_threads(0)


@pytest.fixture(scope="module")
def sweep():
    try:
        return build_sweep()
    except SweepUnavailable as err:
        pytest.skip(f"no memory-bound limit: {err}")


def _kw(data: CaseData) -> dict:
    return {"gamma": data.gamma, "beta": data.beta, "axis": data.case.channel_axis,
            "epsilon": EPSILON}


def _describe(benchmark, data: CaseData, mode: str) -> None:
    benchmark.group = f"{data.case.name} {data.case.layout} {mode}"
    benchmark.extra_info["traffic_bytes"] = data.case.traffic_bytes(mode)


def _assert_identity(y: np.ndarray, x: np.ndarray) -> None:
    """The inference parameters of :func:`make_data` make the map the identity."""
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)


def _assert_normalized(y: np.ndarray, data: CaseData) -> None:
    """Training output: per-channel mean ``beta`` and std ``|gamma|`` (x has variance
    about 1, so ``eps`` shrinks the std by only about 0.05%)."""
    axes = data.case.reduce_axes
    np.testing.assert_allclose(y.mean(axis=axes, dtype=np.float64), data.beta, atol=1e-3)
    np.testing.assert_allclose(y.std(axis=axes, dtype=np.float64), np.abs(data.gamma),
                               rtol=2e-3)


def test_inference_out(benchmark, data, threads):
    _describe(benchmark, data, "infer")
    y = benchmark(cbn.ops.batch_normalization, data.x, data.mean, data.variance,
                  out=data.out, **_kw(data))
    _assert_identity(y, data.x)


def test_inference_inplace(benchmark, data, threads):
    _describe(benchmark, data, "infer")
    before = data.x.copy()
    y = benchmark(cbn.ops.batch_normalization, data.x, data.mean, data.variance,
                  out=data.x, **_kw(data))
    assert y is data.x
    _assert_identity(y, before)


def test_inference_fresh(benchmark, data, threads):
    _describe(benchmark, data, "infer")
    y = benchmark(cbn.ops.batch_normalization, data.x, data.mean, data.variance, **_kw(data))
    _assert_identity(y, data.x)


def test_train_out(benchmark, data, threads):
    _describe(benchmark, data, "train")
    y, mean, variance = benchmark(cbn.ops.batch_norm_train, data.x, out=data.out, **_kw(data))
    assert mean.shape == variance.shape == (data.case.channels,)
    _assert_normalized(y, data)


def _assert_backward(dx: np.ndarray, dgamma: np.ndarray, dbeta: np.ndarray,
                     data: CaseData) -> None:
    """``dbeta = Σ dy`` and ``dgamma = Σ dy·x̂`` per channel, summed here in float64; and
    the training dx in every channel sums to 0 and to ``γ/σ · Σ dy·x̂ · ε/(var + ε)``
    against x̂ (0 but for ε, which keeps ``Σ x̂²`` below n). The sums' scale is √n."""
    axes, shape = data.case.reduce_axes, data.case.param_shape
    mean, variance = (s.reshape(shape) for s in data.batch_statistics)
    x_hat = (data.x - mean) / np.sqrt(variance + EPSILON)
    sum_dy_x_hat = (data.dy * x_hat).sum(axis=axes)
    np.testing.assert_allclose(dbeta, data.dy.sum(axis=axes, dtype=np.float64), atol=1e-3)
    np.testing.assert_allclose(dgamma, sum_dy_x_hat, atol=1e-3)
    np.testing.assert_allclose(dx.sum(axis=axes, dtype=np.float64), 0.0, atol=1e-2)
    variance = variance.reshape(-1)
    expected = data.gamma / np.sqrt(variance + EPSILON) * sum_dy_x_hat * EPSILON / (
        variance + EPSILON)
    np.testing.assert_allclose((dx * x_hat).sum(axis=axes), expected, atol=1e-3)


def test_backward_out(benchmark, data, threads):
    _describe(benchmark, data, "backward")
    mean, variance = data.batch_statistics
    kw = _kw(data)
    del kw["beta"]
    dx, dgamma, dbeta = benchmark(cbn.ops.batch_norm_backward, data.dy, data.x, mean, variance,
                                  out=data.out, **kw)
    assert dx is data.out
    _assert_backward(dx, dgamma, dbeta, data)


def test_layer_backward(benchmark, data, threads):
    _describe(benchmark, data, "backward")
    layer = cbn.BatchNormalization(axis=data.case.channel_axis, epsilon=EPSILON)
    layer.build(data.case.shape)
    layer.set_weights([data.gamma, data.beta, data.mean, data.variance])
    layer(data.x, training=True)
    dx = benchmark(layer.backward, data.dy)
    _assert_backward(dx, *layer.gradients, data)


def test_limit_sweep_out(benchmark, data, threads, sweep):
    _describe(benchmark, data, "infer")
    benchmark(sweep.bind(data.x, data.out, threads))
    _assert_identity(data.out, data.x)


def test_limit_sweep_streaming(benchmark, data, threads, sweep):
    _describe(benchmark, data, "infer")
    benchmark(sweep.bind(data.x, data.out, threads, streaming=True))
    _assert_identity(data.out, data.x)


@pytest.mark.parametrize("streaming", [False, True], ids=["plain", "streaming"])
def test_limit_sweep_two_inputs(benchmark, data, threads, sweep, streaming):
    _describe(benchmark, data, "backward")
    data.out.fill(np.nan)
    benchmark(sweep.bind_two_inputs(data.x, data.dy, data.out, threads, streaming=streaming))
    _assert_identity(data.out, data.x)  # z = 1·x + 0·dy


@pytest.fixture(scope="module")
def tiny() -> CaseData:
    return make_data(TINY)


def test_tiny_ops_call(benchmark, tiny):
    benchmark.group = "tiny 2x3 call"
    y = benchmark(cbn.ops.batch_normalization, tiny.x, tiny.mean, tiny.variance, **_kw(tiny))
    _assert_identity(y, tiny.x)


def test_tiny_layer_call(benchmark, tiny):
    benchmark.group = "tiny 2x3 call"
    layer = cbn.BatchNormalization(axis=-1, epsilon=EPSILON)
    layer.build(tiny.x.shape)
    layer.set_weights([tiny.gamma, tiny.beta, tiny.mean, tiny.variance])
    y = benchmark(layer, tiny.x, training=False)
    _assert_identity(y, tiny.x)
