"""Hostile and edge inputs (issue 28): lazy DLPack bits, zero channels, broken
allreduce results, hostile configs, self-overlapping outputs, fork safety.

Every bad input must raise TypeError/ValueError naming it, with state untouched.
"""

from __future__ import annotations

import multiprocessing
import os
import time

import cbn
import ml_dtypes
import numpy as np
import pytest
from cbn import ops

torch = pytest.importorskip("torch")  # the [test] extra installs it


def _moments64(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    x = x.astype(np.float64)
    return x.mean(axis=red), x.var(axis=red)


# ----------------------------------------------------------------------------- DLPack bits


def test_negative_bit_tensor_is_read_negated():
    z = torch.tensor([[1 + 2j, 3 + 4j], [5 + 1j, 2 + 7j], [4 - 3j, 0 + 1j]], dtype=torch.complex64)
    x = z.conj().imag  # a lazily negated view: its storage holds +imag
    assert x.is_neg()
    expected = -np.array([[2, 4], [1, 7], [-3, 1]], dtype=np.float64)
    mean, var = ops.moments(x, axis=-1)
    ref_mean, ref_var = _moments64(expected, -1)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=1e-6)
    y, _, _ = ops.batch_norm_train(x, axis=-1, epsilon=0.0)
    np.testing.assert_allclose(
        y, (expected - ref_mean) / np.sqrt(ref_var), rtol=1e-5, atol=1e-6
    )


def test_negative_bit_output_is_refused():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    out = torch.zeros(3, 2, dtype=torch.complex64).conj().imag
    assert out.is_neg()
    with pytest.raises(ValueError, match="neg"):
        ops.batch_normalization(x, np.zeros(2), np.ones(2), out=out)


# ----------------------------------------------------------------------------- float64 range


@pytest.mark.parametrize("value", [1.4e154, -1e200, 1e300])
@pytest.mark.parametrize("shape, axis", [((4, 2), -1), ((3, 2, 70), 1)])
def test_float64_statistics_of_huge_constant_data_are_exact(value, shape, axis):
    # Issue 28 item 3: the first merge multiplied delta² = inf by a zero count.
    x = np.full(shape, value)
    mean, var = ops.moments(x, axis=axis)
    assert np.all(mean == value) and np.all(var == 0.0)


def test_float64_statistics_near_1e150_match_a_float64_reference():
    rng = np.random.default_rng(5)
    x = 1e150 * (1.0 + 0.2 * rng.standard_normal((300, 3)))
    mean, var = ops.moments(x, axis=-1)
    scaled = x / 1e150  # the reference in a comfortable range, scaled back
    np.testing.assert_allclose(mean, 1e150 * scaled.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(var, 1e300 * scaled.var(axis=0), rtol=1e-11)


@pytest.mark.parametrize("shape, axis", [((31, 8), -1), ((4, 3, 300), 1)])
def test_float64_variance_beyond_the_range_is_inf_not_0(shape, axis):
    # Found by the C API fuzzer: a spread whose squares overflow made b − a²/n = inf − inf,
    # which the clamp of negative rounding turned into 0 (y then blew up silently).
    x = 1e200 * np.random.default_rng(2).uniform(-1, 1, shape)
    mean, var = ops.moments(x, axis=axis)
    assert np.all(var == np.inf) and np.all(np.isfinite(mean))
    with np.errstate(over="ignore"):
        assert np.all(np.var(x, axis=tuple(a for a in range(x.ndim) if a != axis % x.ndim))
                      == np.inf)


def test_float64_layer_trained_on_1e200_keeps_finite_moving_statistics():
    layer = cbn.BatchNormalization(dtype="float64", momentum=0.99)
    y = layer(np.full((8, 3), 1e200), training=True)
    np.testing.assert_allclose(layer.moving_mean, np.full(3, 0.01 * 1e200), rtol=1e-14)
    np.testing.assert_allclose(layer.moving_variance, np.full(3, 0.99), rtol=1e-15)
    np.testing.assert_array_equal(y, np.zeros((8, 3)))  # (x - mean) = 0, beta = 0


# ----------------------------------------------------------------------------- float32 range


def _float64_reference(x, axis, mask=None):
    """Mean and biased variance per channel of x (float64), over the used positions."""
    x64 = np.moveaxis(np.asarray(x, np.float64), axis, -1).reshape(-1, x.shape[axis])
    used = np.ones(x64.shape, bool) if mask is None else np.moveaxis(
        np.broadcast_to(mask, x.shape), axis, -1).reshape(x64.shape)
    n = used.sum(axis=0)
    mean = np.where(used, x64, 0).sum(axis=0) / n
    var = np.where(used, (x64 - mean) ** 2, 0).sum(axis=0) / n
    return mean, var


def test_float32_data_spanning_the_whole_range_normalizes_exactly():
    # Issue 28 item 4: x − K overflowed float32 (mean NaN). The variance, 9e76, is
    # beyond float32: returned as inf (NumPy's float32 variance too); y used float64.
    x = np.array([[-3e38], [3e38]], np.float32)
    y, mean, var = ops.batch_norm_train(x, epsilon=0.0)
    np.testing.assert_allclose(mean, [0.0], atol=1e31)
    assert var[0] == np.inf
    np.testing.assert_allclose(y, [[-1.0], [1.0]], rtol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape, axis", [((6000, 1), -1), ((6000, 3), -1), ((40, 3, 150), 1),
                                         ((3, 4000), 0)])
@pytest.mark.parametrize("deviation", [1e19, 1e20])
def test_float32_deviations_beyond_2e18_give_exact_statistics(threads, shape, axis, deviation):
    # Issue 28 item 4: float32 block sums of squares overflowed (variance inf, y = 0).
    # At ±1e19 the variance fits float32; at ±1e20 it rounds to inf, y stays exact.
    x = np.where(np.arange(np.prod(shape)).reshape(shape) % 2 == 0, deviation, -deviation)
    x = x.astype(np.float32)
    cbn.set_num_threads(threads)
    try:
        y, mean, var = ops.batch_norm_train(x, axis=axis, epsilon=0.0)
        moments = ops.moments(x, axis=axis)
    finally:
        cbn.set_num_threads(0)
    ref_mean, ref_var = _float64_reference(x, axis)
    for m, v in [(mean, var), moments]:
        np.testing.assert_allclose(m, ref_mean, atol=1e-6 * deviation)
        with np.errstate(over="ignore"):
            np.testing.assert_allclose(v, ref_var.astype(np.float32), rtol=1e-6)
    channel_shape = [1] * x.ndim
    channel_shape[axis] = -1
    ref_y = (x.astype(np.float64) - ref_mean.reshape(channel_shape)) / np.sqrt(
        ref_var.reshape(channel_shape))
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_float32_overflow_rescue_is_per_channel_and_respects_masks_and_strides(dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((600, 4)).astype(np.float32)
    x[:, 1] *= 5e18  # squares of ~1e19 overflow the float32 block sums
    x[:, 3] = 1.5e19 * np.sign(x[:, 3])
    x = x.astype(dtype)[::-2]  # a negative-stride view
    mask = rng.random(x.shape) < 0.7
    mean, var = ops.moments(x, axis=-1, mask=mask)
    ref_mean, ref_var = _float64_reference(x, -1, mask)
    np.testing.assert_array_less(np.abs(mean - ref_mean), 1e-6 * np.sqrt(ref_var))
    np.testing.assert_allclose(var, ref_var, rtol=1e-5)


def test_float32_rescue_in_the_cache_blocked_training_forward():
    x = np.where(np.arange(16 * 8 * 300).reshape(16, 8, 300) % 3 == 0, 2e19, -1e19)
    x = x.astype(np.float32)
    cbn.set_cache_sizes(l2=4096, l3=65536)  # channels in chunks
    try:
        y, mean, var = ops.batch_norm_train(x, axis=1, epsilon=0.0)
    finally:
        cbn.set_cache_sizes()
    ref_mean, ref_var = _float64_reference(x, 1)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=1e-6)
    ref_y = (x.astype(np.float64) - ref_mean[:, None]) / np.sqrt(ref_var[:, None])
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)


def test_float32_nan_still_stays_in_its_own_channel():
    x = np.ones((50, 3), np.float32)
    x[:, 0] = 1e18 * np.arange(50)  # float32 block sums overflow: recomputed
    x[7, 1] = np.nan
    mean, var = ops.moments(x, axis=-1)
    assert np.isnan(mean[1]) and np.isnan(var[1])
    assert np.isfinite(mean[0]) and np.isfinite(var[0]) and mean[2] == 1.0 and var[2] == 0.0


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_data_gives_a_nan_variance_in_its_channel_only(threads, dtype, bad):
    # As NumPy's var: a NaN, or an infinity (inf - inf), leaves the channel's variance NaN,
    # however many slots merged it (the merge clamps only negative rounding to 0).
    x = np.random.default_rng(4).standard_normal((4096, 64)).astype(dtype)
    x[3000, 5] = bad
    cbn.set_num_threads(threads)
    try:
        mean, var = ops.moments(x, axis=-1)
    finally:
        cbn.set_num_threads(0)
    assert np.isnan(var[5]) and np.isnan(np.var(x[:, 5].astype(np.float64)))
    assert not np.isfinite(mean[5])
    others = np.arange(64) != 5
    ref_mean, ref_var = _float64_reference(x[:, others], -1)
    np.testing.assert_allclose(mean[others], ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var[others], ref_var, rtol=1e-5)


def test_nan_reaches_only_its_channel_and_masked_out_nan_nothing():
    # Issue 28 item 10, as docs/behaviour.md "Numbers at the edges" states it.
    rng = np.random.default_rng(8)
    x = rng.standard_normal((20, 3))
    x[4, 0] = np.nan
    x[6, 2] = np.nan
    mask = np.ones(20, bool)
    mask[6] = False  # channel 2's NaN is masked out; channel 0's is used
    mask = np.broadcast_to(mask[:, None], x.shape)
    layer = cbn.BatchNormalization(dtype="float64", momentum=0.5)
    y = layer(x, training=True, mask=mask[:, 0])
    assert np.all(np.isnan(y[:, 0])) and np.isnan(layer.moving_mean[0])
    ref_mean, ref_var = _float64_reference(x[:, 1:], -1, mask[:, 1:])
    np.testing.assert_allclose(layer.moving_mean[1:], 0.5 * ref_mean, rtol=1e-13)
    np.testing.assert_allclose(layer.moving_variance[1:], 0.5 + 0.5 * ref_var, rtol=1e-13)
    np.testing.assert_allclose(y[mask[:, 2], 2], ((x[:, 2] - ref_mean[1]) / np.sqrt(
        ref_var[1] + 1e-3))[mask[:, 2]], rtol=1e-12)


def test_epsilon_zero_gives_nan_for_a_constant_channel_and_momentum_is_unchecked():
    x = np.array([[1.0, 2.0], [1.0, 4.0]])
    y, _, var = ops.batch_norm_train(x, epsilon=0.0)
    assert var[0] == 0.0 and np.all(np.isnan(y[:, 0]))
    np.testing.assert_allclose(y[:, 1], [-1.0, 1.0])
    layer = cbn.BatchNormalization(momentum=1.5, dtype="float64")
    layer(x, training=True)
    np.testing.assert_allclose(layer.moving_mean, 1.5 * 0 - 0.5 * np.array([1.0, 3.0]))


# ----------------------------------------------------------------------------- C = 0


@pytest.mark.parametrize("shape,axis", [((2, 3, 0), -1), ((0,), 0), ((2, 0, 3), [1, 2])])
def test_zero_channels_everywhere(shape, axis):
    x = np.zeros(shape, np.float32)
    mean, var = ops.moments(x, axis=axis)
    assert mean.size == 0 and var.size == 0
    y, m, v = ops.batch_norm_train(x, axis=axis)
    assert y.shape == shape and m.size == 0 and v.size == 0
    assert ops.batch_normalization(x, m, v, axis=axis).shape == shape
    dx = ops.batch_norm_backward(np.zeros_like(x), x, m, v, axis=axis)
    assert np.asarray(dx[0] if isinstance(dx, tuple) else dx).shape == shape
    layer = cbn.BatchNormalization(axis=axis)
    assert layer(x, training=True).shape == shape
    assert layer.backward(np.zeros_like(x)).shape == shape
    assert all(g.size == 0 for g in layer.gradients)
    assert layer(x).shape == shape


# ----------------------------------------------------------------------------- allreduce results


def _replace_result(values):
    def allreduce(buf):
        out = buf.copy()
        for index, value in values.items():
            out[index] = value
        return out

    return allreduce


BROKEN_RESULTS = {
    "nan count": {0: np.nan},
    "negative count": {1: -4.0},
    "fractional count": {0: 2.5},
    "inf count": {1: np.inf},
    "inf sum": {3: np.inf},
    "nan sum": {5: np.nan},
}


@pytest.mark.parametrize("case", sorted(BROKEN_RESULTS))
def test_allreduce_result_validated_ops(case):
    x = np.random.default_rng(0).normal(size=(8, 2)).astype(np.float32)
    allreduce = _replace_result(BROKEN_RESULTS[case])
    out = np.full_like(x, 7.0)
    with pytest.raises(ValueError, match="allreduce"):
        ops.batch_norm_train(x, axis=-1, allreduce=allreduce, out=out)
    assert (out == 7.0).all()
    with pytest.raises(ValueError, match="allreduce"):
        ops.batch_norm_backward(x, x, np.zeros(2), np.ones(2), allreduce=allreduce)


@pytest.mark.parametrize("case", sorted(BROKEN_RESULTS))
def test_allreduce_result_validated_layer_state_untouched(case):
    x = np.random.default_rng(1).normal(size=(8, 2)).astype(np.float32)
    layer = cbn.BatchNormalization(
        synchronized=True, allreduce=_replace_result(BROKEN_RESULTS[case])
    )
    layer.build(x.shape)
    before = [w.copy() for w in layer.get_weights()]
    with pytest.raises(ValueError, match="allreduce"):
        layer(x, training=True)
    for got, want in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- configs

HOSTILE_CONFIGS = [
    (lambda: cbn.BatchNormalization.from_config([1, 2]), TypeError),
    (lambda: cbn.BatchNormalization.from_config("axis=-1"), TypeError),
    (lambda: cbn.BatchNormalization(epsilon=10**400), ValueError),
    (lambda: cbn.BatchNormalization(momentum=10**400), ValueError),
    (lambda: cbn.BatchNormalization(
        gamma_initializer={"class_name": "RandomNormal", "config": {"seed": {"config": 5}}}),
     None),  # a SeedGenerator config holding a bare int is that int
    (lambda: cbn.BatchNormalization(
        gamma_initializer={"class_name": "RandomNormal", "config": {"seed": {"config": "x"}}}),
     TypeError),
    (lambda: cbn.BatchNormalization(
        gamma_constraint={"class_name": "MaxNorm", "config": {"max_value": float("nan")}}),
     ValueError),
    (lambda: cbn.BatchNormalization(
        gamma_constraint={"class_name": "MinMaxNorm", "config": {"min_value": float("nan")}}),
     ValueError),
    (lambda: cbn.BatchNormalization(
        gamma_constraint={"class_name": "MaxNorm", "config": {"axis": "rows"}}),
     TypeError),
    (lambda: cbn.BatchNormalization(
        gamma_initializer={"class_name": "Constant", "config": [1]}), ValueError),
]


@pytest.mark.parametrize("index", range(len(HOSTILE_CONFIGS)))
def test_hostile_config_rejected_clearly(index):
    make, error = HOSTILE_CONFIGS[index]
    if error is None:
        make()
        return
    with pytest.raises(error) as info:
        make()
    assert len(str(info.value)) < 400


def test_initializer_whose_draws_overflow_is_refused():
    layer = cbn.BatchNormalization(
        gamma_initializer={"class_name": "RandomNormal", "config": {"stddev": 1e308, "seed": 1}}
    )
    with pytest.raises(ValueError, match="non-finite"):
        layer.build((4, 3))
    layer = cbn.BatchNormalization(gamma_initializer={"class_name": "Constant",
                                                      "config": {"value": 1e39}})
    with pytest.raises(ValueError, match="non-finite"):
        layer.build((2, 3))  # float32 weights


def test_huge_axis_list_fails_fast_with_a_short_message():
    start = time.perf_counter()
    for make in (lambda: cbn.BatchNormalization(axis=list(range(10**6))),
                 lambda: ops.moments(np.zeros((2, 2)), axis=list(range(10**6)))):
        with pytest.raises(ValueError) as info:
            make()
        assert len(str(info.value)) < 200
    assert time.perf_counter() - start < 30  # generous: it was 9 s and 7 MB of message


def test_non_finite_constraint_values_never_reach_gamma():
    with pytest.raises(ValueError, match="max_value"):
        cbn.BatchNormalization.from_config(
            {"axis": -1, "gamma_constraint": {"class_name": "MaxNorm",
                                              "config": {"max_value": float("nan"), "axis": 0}}}
        )


# ----------------------------------------------------------------------------- outputs


def test_stride0_output_is_refused():
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    shared = np.zeros(3, np.float32)
    out = np.lib.stride_tricks.as_strided(shared, shape=(4, 3), strides=(0, 4), writeable=True)
    for call in (
        lambda: ops.batch_normalization(x, np.zeros(3), np.ones(3), out=out),
        lambda: ops.batch_norm_train(x, out=out),
        lambda: ops.batch_norm_backward(x, x, np.zeros(3), np.ones(3), out=out),
    ):
        with pytest.raises(ValueError, match="stride-0"):
            call()
    assert (shared == 0).all()


# ----------------------------------------------------------------------------- fork


def _parallel_sized_moments() -> np.ndarray:
    x = (np.arange(1 << 18, dtype=np.float64) % 7).reshape(-1, 4)
    return ops.moments(x, axis=-1)[0]


def _one_thread_moments_after_a_parallel_call() -> np.ndarray:
    """What the forked child (one thread) must compute, bitwise: results depend on the
    thread count, so the parent computes them on one thread too, after a 2-thread call
    has made its OpenMP pool."""
    _parallel_sized_moments()
    cbn.set_num_threads(1)
    expected = _parallel_sized_moments()
    cbn.set_num_threads(2)
    return expected


def _child_moments(queue) -> None:
    queue.put((cbn.get_num_threads(), _parallel_sized_moments().tolist()))


def test_os_fork_child_after_parallel_call_runs_on_one_thread():
    cbn.set_num_threads(2)
    try:
        expected = _one_thread_moments_after_a_parallel_call()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: must not hang, must agree
            try:
                os.close(read)
                signal_ok = cbn.get_num_threads() == 1
                ok = signal_ok and np.array_equal(_parallel_sized_moments(), expected)
                cbn.set_num_threads(2)
                ok = ok and cbn.get_num_threads() == 2
                os.write(write, b"1" if ok else b"0")
            finally:
                os._exit(0)
        os.close(write)
        deadline = time.monotonic() + 120
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung in its first parallel call")
        assert os.read(read, 1) == b"1"
        os.close(read)
        assert cbn.get_num_threads() == 2  # the parent keeps its setting
    finally:
        cbn.set_num_threads(0)


def test_multiprocessing_fork_child_runs():
    cbn.set_num_threads(2)
    try:
        expected = _one_thread_moments_after_a_parallel_call()
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        proc = ctx.Process(target=_child_moments, args=(queue,))
        proc.start()
        threads, mean = queue.get(timeout=120)
        proc.join(timeout=30)
        assert threads == 1
        np.testing.assert_array_equal(mean, expected)
    finally:
        cbn.set_num_threads(0)
