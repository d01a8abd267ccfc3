"""Interleaved timing: every implementation of a group is sampled in turn
(A, B, C, A, B, C, ...), so all of them see the same machine state. On a shared
VM the memory bandwidth changes every few tens of seconds; timing all of A and
then all of B would turn that into a fake speed difference.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    """How much to sample each implementation of a group.

    Each sample times a block of back-to-back calls lasting about ``block_s``
    (one call when a call is longer) and records the time per call. An
    implementation is sampled at least ``min_samples`` times, then until it has
    ``max_samples`` or has used ``budget_s`` seconds. ``pause_s`` of sleep precedes
    every sample, so thread pools that spin after a call (GNU OpenMP, ONNX
    Runtime) are asleep before another library's call starts; then one untimed
    call wakes the sampled library's threads and the cores, since the first call
    after the pause is slow whatever the library (64x1x256x256 in place: 0.5 ms
    against 0.2 ms back to back), and would be the whole sample of a call longer
    than ``block_s``.
    """

    min_samples: int = 5
    max_samples: int = 11
    budget_s: float = 0.5
    block_s: float = 0.01
    pause_s: float = 0.01
    warmup_calls: int = 2


DEFAULT = Policy()
QUICK = Policy(min_samples=3, max_samples=5, budget_s=0.12, block_s=0.005, pause_s=0.008)


def _time_block(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return time.perf_counter() - start


def _calls_per_block(fn: Callable[[], object], policy: Policy) -> int:
    """Calls that last about ``block_s``, from the fastest of three calls after the
    pause: one call that met another library's spinning threads (ONNX Runtime's
    spin for milliseconds after a run) used to set one or two calls per block, and
    every sample then timed a single call woken from sleep (2x the in-place time)."""
    time.sleep(policy.pause_s)
    one = min(_time_block(fn, 1) for _ in range(3))
    return max(1, min(100_000, int(policy.block_s / max(one, 1e-7))))


def _needs_more(samples: list[float], spent: float, policy: Policy) -> bool:
    if len(samples) < policy.min_samples:
        return True
    return len(samples) < policy.max_samples and spent < policy.budget_s


def interleaved_medians(
    fns: dict[str, Callable[[], object]], policy: Policy
) -> dict[str, float]:
    """Median seconds per call of each function, sampled round-robin."""
    gc.collect()
    gc.disable()
    try:
        for fn in fns.values():
            for _ in range(policy.warmup_calls):
                fn()
        calls = {key: _calls_per_block(fn, policy) for key, fn in fns.items()}
        samples: dict[str, list[float]] = {key: [] for key in fns}
        spent = dict.fromkeys(fns, 0.0)
        while True:
            active = [k for k in fns if _needs_more(samples[k], spent[k], policy)]
            if not active:
                break
            for key in active:
                time.sleep(policy.pause_s)
                fns[key]()
                elapsed = _time_block(fns[key], calls[key])
                samples[key].append(elapsed / calls[key])
                spent[key] += elapsed
    finally:
        gc.enable()
    return {key: statistics.median(values) for key, values in samples.items()}
