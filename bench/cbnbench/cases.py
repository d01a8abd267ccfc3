"""The benchmark cases (float32 shapes and layouts) and the arrays each one uses."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np

EPSILON = 1e-3
MODES = ("infer", "train", "backward")


@dataclass(frozen=True)
class Case:
    """A float32 input of ``shape``; ``layout`` says where the channel axis is:
    last for ``NHWC`` and ``NC``, second for ``NCHW``."""

    shape: tuple[int, ...]
    layout: str
    quick: bool = False

    @property
    def name(self) -> str:
        return "x".join(str(d) for d in self.shape)

    @property
    def channel_axis(self) -> int:
        return 1 if self.layout == "NCHW" else len(self.shape) - 1

    @property
    def channels(self) -> int:
        return self.shape[self.channel_axis]

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        return tuple(i for i in range(len(self.shape)) if i != self.channel_axis)

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Shape of a per-channel parameter broadcast against the input."""
        return tuple(self.channels if i == self.channel_axis else 1 for i in range(len(self.shape)))

    @property
    def nbytes(self) -> int:
        return 4 * math.prod(self.shape)

    def traffic_bytes(self, mode: str) -> int:
        """Bytes a perfect kernel moves: the input read once and the output written once;
        backward reads two tensors (x and dy) and writes one (dx)."""
        return (3 if mode == "backward" else 2) * self.nbytes


# NHWC cases and their NCHW twins; 2-D (N, C) cases; C = 1 and C = 3 (image inputs);
# one tensor far larger than the caches; one tiny call (pure overhead).
CASES: tuple[Case, ...] = (
    Case((32, 56, 56, 64), "NHWC", quick=True),
    Case((32, 64, 56, 56), "NCHW", quick=True),
    Case((8, 14, 14, 256), "NHWC"),
    Case((8, 256, 14, 14), "NCHW"),
    Case((256, 1024), "NC", quick=True),
    Case((2048, 2048), "NC"),
    Case((32, 224, 224, 3), "NHWC", quick=True),
    Case((32, 3, 224, 224), "NCHW"),
    Case((64, 256, 256, 1), "NHWC"),
    Case((64, 1, 256, 256), "NCHW"),
    Case((64, 56, 56, 256), "NHWC"),
    Case((64, 256, 56, 56), "NCHW"),
    Case((2, 3), "NC", quick=True),
)

TINY = Case((2, 3), "NC")


def select_cases(names: str | None, quick: bool) -> list[Case]:
    """``names``: comma-separated case names (``32x56x56x64``), ``all`` or ``quick``;
    ``None`` means the quick set with ``--quick`` and every case otherwise."""
    if names is None:
        names = "quick" if quick else "all"
    if names == "all":
        return list(CASES)
    if names == "quick":
        return [c for c in CASES if c.quick]
    by_name = {c.name: c for c in CASES}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown case(s) {unknown}; known: {', '.join(by_name)}")
    return [by_name[n] for n in wanted]


@dataclass
class CaseData:
    """The arrays of one case, allocated once and reused by every implementation.

    The inference parameters make ``gamma / sqrt(variance + eps) == 1`` and
    ``beta == mean`` per channel, so the map is the identity up to rounding:
    in-place implementations can run thousands of times on ``x`` without its
    values drifting (towards denormals or infinities, which would change the
    timings). The parameters are still arbitrary per-channel numbers to every
    implementation; none of them special-cases their values.
    """

    case: Case
    x: np.ndarray
    out: np.ndarray
    mean: np.ndarray
    variance: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray

    def params(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "variance": self.variance,
                "gamma": self.gamma, "beta": self.beta}

    # Backward rows only: made on first use, so other runs do not pay for them.

    @cached_property
    def dy(self) -> np.ndarray:
        """The gradient of the output that backward rows propagate."""
        return np.random.default_rng(1).standard_normal(self.case.shape, dtype=np.float32)

    @cached_property
    def batch_statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and variance of ``x`` (float64, by NumPy): what the training
        forward hands to the backward pass."""
        axes = self.case.reduce_axes
        return (self.x.mean(axis=axes, dtype=np.float64),
                self.x.var(axis=axes, dtype=np.float64))


def make_data(case: Case, seed: int = 0) -> CaseData:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(case.shape, dtype=np.float32)
    out = np.empty_like(x)
    out.fill(0.0)  # touch every page now, not in the first timed call
    c = case.channels
    mean = rng.uniform(-0.5, 0.5, c).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, c).astype(np.float32)
    variance = (gamma.astype(np.float64) ** 2 - EPSILON).astype(np.float32)
    return CaseData(case, x, out, mean, variance, gamma, beta=mean.copy())


def case_arguments(argv: list[str] | None, description: str) -> argparse.Namespace:
    """The options of the benchmarks that time the cases at a few thread counts:
    ``--quick``, ``--threads`` (a list of ints) and ``--cases`` (see select_cases)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="the quick cases, fewer samples")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--cases", default=None, help="case names (compare.py's), 'all', 'quick'")
    args = p.parse_args(argv)
    args.threads = [int(t) for t in args.threads.split(",")]
    return args
