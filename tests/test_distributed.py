"""Synchronized statistics through ``cbn.ops`` with ranks as threads (``ThreadGroup``),
the callback contract, and ``cbn.distributed``'s helpers (spec R14, distributed.md).

The per-rank checks (against float64 NumPy on the concatenated batch) live in
``distributed_check.py``, shared with the MPI and torch.distributed tests."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import reference
from cbn import distributed, ops
from distributed_check import CASES, EPS, run_rank

TIMEOUT = 30.0


def run_threads(n: int, fn, timeout: float = TIMEOUT) -> list:
    """``fn(rank)`` on ``n`` threads at once; the results in rank order. Exceptions are
    returned, not raised, so a test can look at every rank's outcome."""

    def guarded(rank):
        try:
            return fn(rank)
        except Exception as err:  # each rank's outcome is inspected by the test
            return err

    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(guarded, rank) for rank in range(n)]
        return [f.result(timeout=timeout) for f in futures]


def raise_any(results: list) -> None:
    for r in results:
        if isinstance(r, BaseException):
            raise r


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_thread_group_matches_whole_batch_R14_2(case, world):
    """Every rank's statistics, y and dx slices and own dγ/dβ against the single-process
    float64 values on the concatenated batch; one collective per forward and backward."""
    group = distributed.ThreadGroup(world, timeout=TIMEOUT)
    results = run_threads(world, lambda rank: run_rank(case, world, rank, group[rank]))
    raise_any(results)
    # The group sums in rank order, so every rank holds bitwise the same statistics.
    for r in results[1:]:
        np.testing.assert_array_equal(r.mean, results[0].mean)
        np.testing.assert_array_equal(r.variance, results[0].variance)


@pytest.mark.parametrize("shifted", [True, False])
def test_shift_keeps_large_mean_exact(shifted):
    """distributed.md: with a shift near the mean the one-buffer merge stays exact at
    mean/std = 1e6 in float64; from a zero shift it loses ~(|mean|/std)**2 * 1e-16 ~ 1e-4
    relative in the variance (the documented limit, so the shift is what makes it exact)."""
    rng = np.random.default_rng(3)
    x = rng.normal(1e6, 1.0, (3000, 4))
    shards = np.array_split(x, [1000, 1700])
    shift = np.full(4, 1e6 + 0.3) if shifted else None
    group = distributed.ThreadGroup(3, timeout=TIMEOUT)
    results = run_threads(3, lambda r: ops.batch_norm_train(shards[r], allreduce=group[r],
                                                            shift=shift))
    raise_any(results)
    ref_mean, ref_var = reference.moments(x)
    for _, mean, var in results:
        np.testing.assert_allclose(mean, ref_mean, rtol=1e-14)
        if shifted:
            np.testing.assert_allclose(var, ref_var, rtol=1e-9)
        else:
            assert np.abs(var - ref_var).max() / ref_var.max() > 1e-6


def test_synchronized_in_place():
    """out=x in the forward and out=dy in the backward give the out-of-place results."""
    rng = np.random.default_rng(8)
    xs = [rng.normal(1.0, 2.0, (n, 3, 6)).astype(np.float32) for n in (5, 2)]
    dys = [rng.normal(0.0, 1.0, x.shape).astype(np.float32) for x in xs]
    mask = [rng.random(x.shape[:-1]) > 0.3 for x in xs]

    def step(rank, group, in_place):
        x, dy = xs[rank].copy(), dys[rank].copy()
        y, mean, var = ops.batch_norm_train(x, mask=mask[rank], allreduce=group[rank],
                                            out=x if in_place else None)
        dx, dgamma, dbeta = ops.batch_norm_backward(dy, xs[rank], mean, var, mask=mask[rank],
                                                    allreduce=group[rank],
                                                    out=dy if in_place else None)
        assert (y is x and dx is dy) == in_place
        return y, dx, dgamma, dbeta

    runs = []
    for in_place in (False, True):
        group = distributed.ThreadGroup(2, timeout=TIMEOUT)
        runs.append(run_threads(2, lambda rank, g=group, p=in_place: step(rank, g, p)))
        raise_any(runs[-1])
    for separate, in_place in zip(*runs, strict=True):
        for a, b in zip(separate, in_place, strict=True):
            np.testing.assert_array_equal(a, b)


# ---- the callback contract -----------------------------------------------------------

def data(shape=(6, 5), seed=0, dtype=np.float32):
    return np.random.default_rng(seed).normal(2.0, 1.5, shape).astype(dtype)


def in_place_identity(buf):
    """A world of one rank, summing in place."""


@pytest.mark.parametrize("callback", [in_place_identity, lambda buf: buf.copy(),
                                      lambda buf: buf * 1.0],
                         ids=["in_place", "returned", "returned_new"])
def test_callback_in_place_or_returned(callback):
    x = data()
    mask = np.random.default_rng(1).random(x.shape[:-1]) > 0.3
    mask[0] = True
    dy = data(seed=2)
    y, mean, var = ops.batch_norm_train(x, mask=mask, allreduce=callback)
    ref_mean, ref_var = reference.moments(x, -1, mask)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=1e-6)
    y_ref = reference.normalize(x, ref_mean, ref_var, eps=EPS)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5)
    dx, dgamma, dbeta = ops.batch_norm_backward(dy, x, mean, var, mask=mask, allreduce=callback)
    dx_ref, dgamma_ref, dbeta_ref = reference.backward(dy, x, None, -1, mask, EPS)
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-4)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-5, atol=1e-5)


def test_buffer_handed_to_the_callback():
    """3·C float64 values, 1-D, contiguous and writeable, once per phase."""
    seen = []

    def spy(buf):
        seen.append((buf.dtype, buf.shape, buf.flags.c_contiguous, buf.flags.writeable))

    x = data((4, 3, 7))
    _, mean, var = ops.batch_norm_train(x, axis=[1, 2], allreduce=spy)
    ops.batch_norm_backward(x, x, mean, var, axis=[1, 2], allreduce=spy)
    assert seen == [(np.dtype(np.float64), (63,), True, True)] * 2


@pytest.mark.parametrize("returned,error,match", [
    (np.zeros(9, np.float32), TypeError, "dtype float32; expected float64"),
    (np.zeros(8), ValueError, r"shape \(8,\); expected the buffer's shape \(9,\)"),
    (np.zeros((3, 3)), ValueError, r"shape \(3, 3\)"),
    ([0.0] * 9, TypeError, "returned list; expected None"),
    (0, TypeError, "returned int; expected None"),
])
def test_callback_returning_the_wrong_thing(returned, error, match):
    x = data((4, 3))
    out = x.copy()
    with pytest.raises(error, match=match):
        ops.batch_norm_train(x, allreduce=lambda buf: returned, out=out)
    np.testing.assert_array_equal(out, x)  # nothing written
    mean, var = reference.moments(x)
    dy = data((4, 3), seed=5)
    grad = dy.copy()
    with pytest.raises(error, match=match):
        ops.batch_norm_backward(grad, x, mean, var, allreduce=lambda buf: returned, out=grad)
    np.testing.assert_array_equal(grad, dy)


class Boom(Exception):
    pass


def test_raising_callback_propagates_and_writes_nothing():
    def fail(buf):
        buf[:] = np.nan  # even a callback that scribbles first cannot change the output
        raise Boom("network down")

    x = data((8, 4))
    x_before = x.copy()
    with pytest.raises(Boom, match="network down"):
        ops.batch_norm_train(x, allreduce=fail, out=x)
    np.testing.assert_array_equal(x, x_before)
    mean, var = reference.moments(x)
    dy = data((8, 4), seed=1)
    dy_before = dy.copy()
    with pytest.raises(Boom):
        ops.batch_norm_backward(dy, x, mean, var, allreduce=fail, out=dy)
    np.testing.assert_array_equal(dy, dy_before)


def test_backward_with_fixed_statistics_never_communicates():
    calls = []
    x = data((8, 4))
    mean, var = np.zeros(4), np.ones(4)
    dx, _, _ = ops.batch_norm_backward(x, x, mean, var, training=False,
                                       allreduce=lambda buf: calls.append(buf))
    assert calls == []
    np.testing.assert_allclose(dx, x / np.sqrt(1 + EPS), rtol=1e-6)


def test_without_allreduce_nothing_changes():
    """No callback: the local single-call paths, the same as before synchronization."""
    x = data((16, 5))
    y, mean, var = ops.batch_norm_train(x)
    ref_mean, ref_var = reference.moments(x)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=1e-6)


@pytest.mark.parametrize("bad", ["mpi", 3, True])
def test_allreduce_must_be_callable(bad):
    x = data()
    out = x.copy()
    with pytest.raises(TypeError, match="allreduce must be a callable"):
        ops.batch_norm_train(x, allreduce=bad, out=out)
    np.testing.assert_array_equal(out, x)
    with pytest.raises(TypeError, match="allreduce must be a callable"):
        ops.batch_norm_backward(x, x, np.zeros(5), np.ones(5), allreduce=bad)


def test_shift_is_validated():
    x = data()
    with pytest.raises(ValueError, match=r"shift has shape \(4,\); expected \(5,\)"):
        ops.batch_norm_train(x, allreduce=in_place_identity, shift=np.zeros(4))
    with pytest.raises(TypeError, match="shift has dtype"):
        ops.batch_norm_train(x, allreduce=in_place_identity, shift=np.zeros(5, complex))


# ---- the process default ---------------------------------------------------------------

@pytest.fixture
def no_default():
    before = distributed.get_default_allreduce()
    distributed.set_default_allreduce(None)
    yield
    distributed.set_default_allreduce(before)


def test_default_allreduce(no_default):
    assert distributed.get_default_allreduce() is None
    with pytest.raises(ValueError, match="set_default_allreduce"):
        distributed.resolve_allreduce(None)
    distributed.set_default_allreduce(in_place_identity)
    assert distributed.get_default_allreduce() is in_place_identity
    assert distributed.resolve_allreduce(None) is in_place_identity
    explicit = distributed.ThreadGroup(1)[0]
    assert distributed.resolve_allreduce(explicit) is explicit
    distributed.set_default_allreduce(None)
    assert distributed.get_default_allreduce() is None


def test_default_allreduce_must_be_callable(no_default):
    with pytest.raises(TypeError, match="the default allreduce must be a callable"):
        distributed.set_default_allreduce("mpi")
    assert distributed.get_default_allreduce() is None
    with pytest.raises(TypeError, match="allreduce must be a callable"):
        distributed.resolve_allreduce(42)


def test_torch_allreduce_needs_an_initialized_group():
    import torch.distributed as dist  # the [test] extra pins torch

    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_process_group"):
        distributed.TorchAllreduce()(np.zeros(3))


# ---- ThreadGroup ------------------------------------------------------------------------

def test_thread_group_sums_in_rank_order_every_time():
    n, steps = 3, 40
    group = distributed.ThreadGroup(n, timeout=TIMEOUT)
    rng = np.random.default_rng(0)
    # Values whose float sum depends on the order: the result must be ((b0 + b1) + b2).
    bufs = rng.normal(0, 1, (steps, n, 7)) * 10.0 ** rng.integers(-8, 8, (steps, n, 7))
    expected = (bufs[:, 0] + bufs[:, 1]) + bufs[:, 2]

    def rank_loop(rank):
        out = []
        for step in range(steps):
            buf = bufs[step, rank].copy()
            assert group[rank](buf) is None  # in place
            out.append(buf)
        return np.array(out)

    results = run_threads(n, rank_loop)
    raise_any(results)
    for r in results:
        np.testing.assert_array_equal(r, expected)


def test_thread_group_members():
    group = distributed.ThreadGroup(3)
    assert len(group) == 3 and group.size == 3
    assert [m.rank for m in group] == [0, 1, 2]
    assert group[1] is group.member(1)
    assert "member 1 of 3" in repr(group[1])
    with pytest.raises(ValueError, match="rank 3 is out of range for a ThreadGroup of 3"):
        group[3]
    with pytest.raises(ValueError, match="out of range"):
        group.member(-1)
    with pytest.raises(TypeError, match="rank must be an int"):
        group["0"]
    one = distributed.ThreadGroup(1)
    buf = np.arange(4.0)
    one[0](buf)
    np.testing.assert_array_equal(buf, np.arange(4.0))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"n": 0}, ValueError, "n must be at least 1; received 0"),
    ({"n": 2.0}, TypeError, "n must be an int"),
    ({"n": 2, "timeout": 0}, ValueError, "timeout must be > 0"),
    ({"n": 2, "timeout": "1"}, TypeError, "timeout must be a number of seconds or None"),
    ({"n": 2, "timeout": True}, TypeError, "timeout must be a number"),
])
def test_thread_group_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        distributed.ThreadGroup(**kwargs)


def test_thread_group_timeout_does_not_hang():
    """Rank 1 never calls: rank 0 gets a clear error after the timeout, not a hang."""
    group = distributed.ThreadGroup(2, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 0: the collective was abandoned .*timeout=0.3"):
        group[0](np.zeros(3))
    assert time.monotonic() - start < 5
    with pytest.raises(RuntimeError, match="the group is broken"):
        group[1](np.zeros(3))


def test_thread_group_abort_releases_the_others():
    """A rank that fails before its collective aborts the group; the others stop waiting."""
    group = distributed.ThreadGroup(3, timeout=TIMEOUT)
    x = data((9, 4))

    def rank_step(rank):
        if rank == 2:
            time.sleep(0.2)
            group.abort()
            raise Boom("rank 2 failed before its collective")
        out = x.copy()
        try:
            return ops.batch_norm_train(x, allreduce=group[rank], out=out)
        finally:
            np.testing.assert_array_equal(out, x)  # a failed call writes nothing

    start = time.monotonic()
    results = run_threads(3, rank_step)
    assert time.monotonic() - start < TIMEOUT / 2
    assert isinstance(results[2], Boom)
    for r in results[:2]:
        assert isinstance(r, RuntimeError) and "abandoned" in str(r)


def test_thread_group_bad_buffer_fails_its_rank_and_releases_the_others():
    group = distributed.ThreadGroup(2, timeout=TIMEOUT)
    bufs = [np.zeros(4), np.zeros(4, np.float32)]
    results = run_threads(2, lambda rank: group[rank](bufs[rank]))
    assert isinstance(results[1], TypeError)
    assert "rank 1: expected a writeable 1-D contiguous float64 array; received float32" in str(
        results[1])
    assert isinstance(results[0], RuntimeError)
    read_only = np.zeros(3)
    read_only.flags.writeable = False
    with pytest.raises(TypeError, match=r"received read-only float64 array of shape \(3,\)"):
        distributed.ThreadGroup(1)[0](read_only)
    with pytest.raises(TypeError, match=r"received non-contiguous float64 array"):
        distributed.ThreadGroup(1)[0](np.zeros(6)[::2])


def test_thread_group_length_mismatch_fails_every_rank_and_keeps_the_group():
    group = distributed.ThreadGroup(2, timeout=TIMEOUT)
    results = run_threads(2, lambda rank: group[rank](np.zeros(3 + rank)))
    for r in results:
        assert isinstance(r, ValueError) and "differ in length ([3, 4])" in str(r)
    bufs = [np.ones(3), np.full(3, 2.0)]
    raise_any(run_threads(2, lambda rank: group[rank](bufs[rank])))
    for b in bufs:
        np.testing.assert_array_equal(b, 3.0)


def test_thread_group_member_used_by_two_threads():
    group = distributed.ThreadGroup(2, timeout=1.0)
    entered = threading.Event()

    def first():
        entered.set()
        try:
            group[0](np.zeros(2))
        except RuntimeError:
            pass  # released by the timeout: nobody plays rank 1

    t = threading.Thread(target=first)
    t.start()
    entered.wait()
    time.sleep(0.1)
    with pytest.raises(ValueError, match="rank 0 is already in a collective"):
        group[0](np.zeros(2))
    t.join()
