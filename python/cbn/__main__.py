"""``python -m cbn``: configuration, self-check, and a short benchmark against NumPy.

Exits with status 1 if any self-check case fails. ``--quick`` uses smaller tensors
for the benchmark; ``--no-bench`` skips it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

import cbn
from cbn import ops

from ._selfcheck import run_selfcheck

EPSILON = 1e-3
#: Benchmark tensors: (layout, shape, channel axis). --quick divides the batch by 8.
BENCH_SHAPES = [
    ("NHWC", (32, 56, 56, 64), -1),
    ("NCHW", (32, 64, 56, 56), 1),
    ("NC", (256, 1024), -1),
]
MIN_REPEATS = 3
MAX_REPEATS = 25
TIME_PER_MEASUREMENT = 0.8  # seconds per cbn/NumPy pair, once MIN_REPEATS are done
#: Below this speed-up over NumPy the benchmark explains what may have slowed cbn.
SLOW_SPEED_UP = 1.0


# ---------------------------------------------------------------------------- NumPy baseline


def _channel_view(v: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    """A per-channel vector shaped to broadcast against ``x`` along ``axis``."""
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return v.reshape(shape)


def numpy_inference(x, mean, var, gamma, beta, axis, out):
    """NumPy batch normalization with given statistics: three in-place passes over out."""
    scale = (gamma / np.sqrt(var + EPSILON)).astype(x.dtype)
    np.subtract(x, _channel_view(mean.astype(x.dtype), x, axis), out=out)
    np.multiply(out, _channel_view(scale, x, axis), out=out)
    np.add(out, _channel_view(beta.astype(x.dtype), x, axis), out=out)
    return out


def numpy_train(x, gamma, beta, axis, out):
    """NumPy training forward: batch mean and (two-pass) variance, then normalize."""
    red = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    mean = x.mean(axis=red)
    var = x.var(axis=red)
    return numpy_inference(x, mean, var, gamma, beta, axis, out)


# ---------------------------------------------------------------------------- timing


class ProgressBar:
    """A one-line progress bar on stderr, redrawn with carriage returns."""

    def __init__(self, total: int, width: int = 30):
        self.total, self.width, self.done = total, width, 0

    def show(self, label: str) -> None:
        """Redraw with ``label`` naming the step now running."""
        filled = self.width * self.done // self.total
        bar = "#" * filled + "-" * (self.width - filled)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {label:<40.40}")
        sys.stderr.flush()

    def advance(self) -> None:
        self.done += 1

    def close(self) -> None:
        sys.stderr.write("\r" + " " * (self.width + 50) + "\r")
        sys.stderr.flush()


def median_seconds(*fns: Callable[[], object]) -> list[float]:
    """Median wall time of each function, sampled in turn (A, B, A, B, ...) after one
    warm-up call each, so that drifting memory bandwidth affects them alike."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    spent = 0.0
    while len(times[0]) < MIN_REPEATS or (
        spent < TIME_PER_MEASUREMENT and len(times[0]) < MAX_REPEATS
    ):
        for fn, samples in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
            spent += samples[-1]
    return [statistics.median(samples) for samples in times]


def benchmark_calls(x: np.ndarray, axis: int, rng: np.random.Generator):
    """``{op: (cbn call, NumPy call)}`` for inference and training forward on ``x``,
    both writing into the same preallocated output."""
    out = np.empty_like(x)
    c = x.shape[axis]
    mean, var = rng.standard_normal(c), rng.uniform(0.5, 2.0, c)
    gamma, beta = rng.uniform(0.5, 2.0, c), rng.standard_normal(c)
    return {
        "inference": (
            lambda: ops.batch_normalization(x, mean, var, gamma=gamma, beta=beta, axis=axis,
                                            epsilon=EPSILON, out=out),
            lambda: numpy_inference(x, mean, var, gamma, beta, axis, out),
        ),
        "training": (
            lambda: ops.batch_norm_train(x, gamma=gamma, beta=beta, axis=axis, epsilon=EPSILON,
                                         out=out),
            lambda: numpy_train(x, gamma, beta, axis, out),
        ),
    }


def run_benchmark(quick: bool) -> None:
    """Time cbn and NumPy on each shape, inference and training forward, and print a table.

    GB/s counts the compulsory traffic: x read once and y written once.
    """
    rng = np.random.default_rng(0)
    rows = []
    progress = ProgressBar(2 * len(BENCH_SHAPES))
    for layout, shape, axis in BENCH_SHAPES:
        if quick:
            shape = (max(1, shape[0] // 8),) + shape[1:]
        label = f"{layout} {shape}"
        x = rng.standard_normal(shape, dtype=np.float32) * 2.0 + 1.0
        for op, (cbn_call, numpy_call) in benchmark_calls(x, axis, rng).items():
            progress.show(f"{label} {op}")
            t_cbn, t_numpy = median_seconds(cbn_call, numpy_call)
            rows.append((label, op, t_cbn, t_numpy, 2 * x.nbytes))
            progress.advance()
    progress.close()
    print_table(rows)
    slowest = min(t_numpy / t_cbn for _, _, t_cbn, t_numpy, _ in rows)
    if slowest < SLOW_SPEED_UP:
        print(slow_result_note(slowest))


def slow_result_note(speed_up: float) -> str:
    """Why cbn may have measured slower than expected (the usual causes are the machine's,
    not the kernels')."""
    threads = cbn.get_num_threads()
    return (
        f"\nNote: cbn measured as low as {speed_up:.1f}x NumPy's speed. cbn runs {threads} "
        "OpenMP thread(s), which then compete with other processes: on a busy machine (a build, "
        "tests, other jobs) the timings are meaningless. Run it again on an idle machine, "
        "compare with OMP_NUM_THREADS=1 (or cbn.set_num_threads(1)), and check with "
        "cbn.show_config() that the SIMD level is the best this CPU has."
    )


def print_table(rows) -> None:
    header = f"{'tensor (float32)':<26}{'op':<11}{'cbn ms':>9}{'NumPy ms':>10}" \
             f"{'cbn GB/s':>10}{'NumPy GB/s':>12}{'speed-up':>10}"
    print(header)
    print("-" * len(header))
    for label, op, t_cbn, t_numpy, nbytes in rows:
        print(f"{label:<26}{op:<11}{1e3 * t_cbn:>9.2f}{1e3 * t_numpy:>10.2f}"
              f"{nbytes / t_cbn / 1e9:>10.1f}{nbytes / t_numpy / 1e9:>12.1f}"
              f"{t_numpy / t_cbn:>9.1f}x")


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cbn",
        description="Print cbn's configuration, check it against a float64 NumPy reference "
        "(exit status 1 if a case fails), then time it against NumPy.",
    )
    parser.add_argument("--version", action="version", version=f"cbn {cbn.__version__}")
    parser.add_argument("--quick", action="store_true", help="benchmark smaller tensors")
    parser.add_argument("--no-bench", action="store_true", help="skip the benchmark")
    args = parser.parse_args(argv)

    print("cbn configuration")
    cbn.show_config()
    print()
    passed = run_selfcheck()
    print()
    if not args.no_bench:
        print(f"Benchmark: median wall time, {cbn.get_num_threads()} thread(s); "
              "GB/s = (bytes of x + bytes of y) / time")
        run_benchmark(args.quick)
        print()
    print("self-check: " + ("all cases passed" if passed else "FAILED (see FAIL lines above)"))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
