"""What one call of ``cbn.BatchNormalization`` used, for its ``backward``."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ._ghost import KernelView
from .distributed import Allreduce

__all__ = ["ForwardRecord"]


class ForwardRecord(NamedTuple):
    """What one call used, i.e. what its derivative depends on: the kernel's
    view, the statistics it normalized with (per kept index: per (ghost, channel)),
    whether they were the batch's (training) or constants (inference), the batch's
    per-channel statistics (ghost averages; the moving updates' input) and the
    per-channel γ and constants r, d (renorm), a_scale, a_bias (adjustment). All float64;
    None for γ (scale=False) and for the constants of an inference call (1, 0, 1, 0).
    The view holds the call's input by reference."""

    view: KernelView
    through_stats: bool
    allreduce: Allreduce | None  # synchronized statistics: the backward's collective too
    mean: np.ndarray
    variance: np.ndarray
    batch_mean: np.ndarray
    batch_variance: np.ndarray
    gamma: np.ndarray | None
    r: np.ndarray | None
    d: np.ndarray | None
    adjust_scale: np.ndarray | None
    adjust_bias: np.ndarray | None

    @classmethod
    def of_plain_call(
        cls, view: KernelView, *, through_stats: bool, mean: np.ndarray,
        variance: np.ndarray, gamma: np.ndarray | None,
    ) -> ForwardRecord:
        """A call without synchronization, renorm or adjustment: its statistics are
        the batch's (or the moving ones), with no constants."""
        return cls(
            view=view, through_stats=through_stats, allreduce=None, mean=mean,
            variance=variance, batch_mean=mean, batch_variance=variance, gamma=gamma, r=None,
            d=None, adjust_scale=None, adjust_bias=None,
        )
