"""Threads under contention: every call gives bitwise the same result whether the
whole team ran it, the caller alone (as after late helpers), or the adaptive policy
chose; calls finish while another process competes for the cores; the team state
is reported. No timing is asserted."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import cbn
import numpy as np
import pytest
from cbn import _core, ops

POLICIES = ("full", "caller_only", "adaptive")


@pytest.fixture(autouse=True)
def _restore():
    yield
    _core.set_team_policy("adaptive")
    cbn.set_num_threads(0)
    cbn.set_cache_sizes()


def all_results(x: np.ndarray, dy: np.ndarray, axis: int, mask) -> list[np.ndarray]:
    """Statistics, inference, training forward and backward (both passes) of x."""
    channels = x.shape[axis]
    rng = np.random.default_rng(7)
    gamma, beta = rng.uniform(0.5, 2, channels), rng.uniform(-1, 1, channels)
    mean, var = ops.moments(x, axis=axis, mask=mask)
    y_infer = ops.batch_normalization(x, mean, var, gamma=gamma, beta=beta, axis=axis)
    y, m, v = ops.batch_norm_train(x, gamma=gamma, beta=beta, axis=axis)
    grads = ops.batch_norm_backward(dy, x, m.ravel(), v.ravel(), gamma=gamma, axis=axis)
    frozen = ops.batch_norm_backward(dy, x, m.ravel(), v.ravel(), gamma=gamma, axis=axis,
                                     training=False)
    return [mean, var, y_infer, y, m, v, *grads, *frozen]


def assert_bitwise(a: list[np.ndarray], b: list[np.ndarray]) -> None:
    for u, w in zip(a, b, strict=True):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(w), strict=True)


SHAPES = [((16, 40, 40, 24), 3), ((16, 24, 40, 40), 1), ((600, 257), 1), ((9, 7, 1111), 2)]


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("shape,axis", SHAPES)
def test_results_bitwise_equal_under_every_team_policy(shape, axis, threads):
    rng = np.random.default_rng(len(shape) + axis)
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    cbn.set_num_threads(threads)
    results = {}
    for policy in POLICIES:
        _core.set_team_policy(policy)
        results[policy] = all_results(x, dy, axis, None)
    assert_bitwise(results["full"], results["caller_only"])
    assert_bitwise(results["full"], results["adaptive"])
    # and right: the statistics against a float64 reference
    axes = tuple(i for i in range(x.ndim) if i != axis)
    np.testing.assert_allclose(results["full"][0].ravel(), x.astype(np.float64).mean(axes),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(results["full"][1].ravel(), x.astype(np.float64).var(axes),
                               rtol=1e-5)


def test_chunked_training_forward_bitwise_equal_under_every_team_policy():
    # A tensor larger than half the (overridden) L3: the forward claims chunks of channels.
    rng = np.random.default_rng(3)
    x = rng.standard_normal((8, 64, 32, 32)).astype(np.float32)
    cbn.set_cache_sizes(l2=65536, l3=1 << 20)
    cbn.set_num_threads(2)
    results = {}
    for policy in POLICIES:
        _core.set_team_policy(policy)
        results[policy] = list(ops.batch_norm_train(x, axis=1))
    assert_bitwise(results["full"], results["caller_only"])
    assert_bitwise(results["full"], results["adaptive"])


def test_masked_moments_bitwise_equal_under_every_team_policy():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 30, 30, 8)).astype(np.float32)
    mask = rng.random((64, 30, 30, 1)) < 0.7
    cbn.set_num_threads(2)
    results = {}
    for policy in POLICIES:
        _core.set_team_policy(policy)
        results[policy] = list(ops.moments(x, axis=-1, mask=mask))
    assert_bitwise(results["full"], results["caller_only"])


def test_team_state_counts_calls_and_show_config_reports_it():
    cbn.set_num_threads(2)
    _core.set_team_policy("full")
    x = np.ones((64, 64, 64), np.float32)
    before = _core.team_state()
    ops.batch_norm_train(x, axis=-1)
    after = _core.team_state()
    assert after["policy"] == "full"
    assert after["parallel_calls"] == before["parallel_calls"] + 1
    _core.set_team_policy("caller_only")
    ops.batch_norm_train(x, axis=-1)
    assert _core.team_state()["caller_only_calls"] == after["caller_only_calls"] + 1
    team = cbn.show_config(print_out=False)["team"]
    assert team.startswith("caller_only, full team;")
    assert cbn.get_num_threads() == 2  # the policy leaves the thread count (an upper bound)


def test_concurrent_callers_share_one_team_and_agree_bitwise():
    # Issue 25: one team at a time per process; a caller that finds it taken runs its
    # slots alone, with the same result.
    import threading

    cbn.set_num_threads(2)
    x = np.random.default_rng(3).standard_normal((64, 32, 32, 32)).astype(np.float32)
    _core.set_team_policy("full")
    want = ops.batch_norm_train(x, axis=-1)[0]
    _core.set_team_policy("adaptive")
    before = _core.team_state()
    results: list[np.ndarray] = []

    def call_repeatedly():
        for _ in range(25):
            results.append(ops.batch_norm_train(x, axis=-1)[0])

    callers = [threading.Thread(target=call_repeatedly) for _ in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    after = _core.team_state()
    assert len(results) == 100 and all(np.array_equal(r, want) for r in results)
    assert after["caller_only_calls"] > before["caller_only_calls"]  # some found it taken


def test_unknown_team_policy_is_a_value_error():
    with pytest.raises(ValueError, match="team policy must be one of"):
        _core.set_team_policy("spin")
    assert _core.team_state()["policy"] == "adaptive"


def test_calls_finish_and_agree_while_a_busy_process_competes():
    # Two busy processes (as many as this CI machine has cores, at least) keep the
    # helpers off their cores; every call must still return, with the full team's result.
    code = textwrap.dedent("""
        import numpy as np, cbn
        from cbn import _core, ops
        cbn.set_num_threads(2)
        x = np.random.default_rng(0).standard_normal((32, 28, 28, 32)).astype(np.float32)
        _core.set_team_policy("full")
        want = ops.batch_norm_train(x, axis=-1)[0]
        for policy in ("adaptive", "full"):
            _core.set_team_policy(policy)
            for _ in range(150):
                got = ops.batch_norm_train(x, axis=-1)[0]
                assert np.array_equal(got, want)
        s = _core.team_state()
        assert s["parallel_calls"] + s["caller_only_calls"] >= 300, s
        print("ok")
    """)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(max(1, os.cpu_count() or 1))]
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=300)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_contention_benchmark_runs_and_cleans_up():
    # The smoke run bench/README.md documents: every scenario, both libraries.
    bench = os.path.join(os.path.dirname(__file__), os.pardir, "bench", "contention.py")
    done = subprocess.run([sys.executable, bench, "--quick", "--cases", "256x1024",
                           "--modes", "infer"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    for scenario in ("| idle | 256x1024", "| busy | 256x1024", "| 256x1024 | NC | infer"):
        assert scenario in done.stdout
    assert "after 200 2-thread training calls" in done.stdout

