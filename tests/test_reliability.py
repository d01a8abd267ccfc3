"""Hostile and edge inputs (issue 28): lazy DLPack bits, zero channels, broken
allreduce results, hostile configs, self-overlapping outputs, fork safety.

Every bad input must raise TypeError/ValueError naming it, with state untouched.
"""

from __future__ import annotations

import multiprocessing
import os
import time

import cbn
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


def test_float64_layer_trained_on_1e200_keeps_finite_moving_statistics():
    layer = cbn.BatchNormalization(dtype="float64", momentum=0.99)
    y = layer(np.full((8, 3), 1e200), training=True)
    np.testing.assert_allclose(layer.moving_mean, np.full(3, 0.01 * 1e200), rtol=1e-14)
    np.testing.assert_allclose(layer.moving_variance, np.full(3, 0.99), rtol=1e-15)
    np.testing.assert_array_equal(y, np.zeros((8, 3)))  # (x - mean) = 0, beta = 0


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
