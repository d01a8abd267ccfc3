"""What one call of ``cbn.BatchNormalization`` used, for its ``backward``."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from . import _core
from ._ghost import KernelView, ghost_view
from ._validate import as_array
from .distributed import Allreduce, sum_across_ranks

__all__ = ["ForwardRecord", "PlainCall", "backward_through", "record_of"]


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


#: A plain call of the layer's small path as a bare tuple: (input, output, kept axes,
#: through_stats, mean, variance, gamma). Its ForwardRecord is built only when a
#: backward asks (record_of): building it on every call cost as much as a tiny
#: call's kernel work.
PlainCall = tuple[
    np.ndarray, np.ndarray, tuple[int, ...], bool, np.ndarray, np.ndarray, "np.ndarray | None"
]


def record_of(last: ForwardRecord | PlainCall) -> ForwardRecord:
    """The ForwardRecord of a call kept as a record or as a PlainCall."""
    if isinstance(last, ForwardRecord):
        return last
    x, y, axes, through_stats, mean, variance, gamma = last
    return ForwardRecord.of_plain_call(
        KernelView(x, y, None, axes, 1, None), through_stats=through_stats, mean=mean,
        variance=variance, gamma=gamma)


def backward_through(
    record: ForwardRecord, dy: ArrayLike, channels: int, epsilon: float
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``dx`` for the output gradient ``dy`` of the call ``record`` describes, and the
    per-channel float64 gradients of ``gamma`` and ``beta``: through the batch statistics
    after a training call (one collective when they were synchronized), with constant
    statistics after an inference call; renorm's r, d and the adjustment are constants."""
    view = record.view
    shape = view.y.shape if view.virtual_batch_size is None else (
        (view.y.shape[0] * view.y.shape[1],) + view.y.shape[2:])
    grad = as_array(dy, "dy")
    if grad.shape != shape:
        raise ValueError(
            f"dy has shape {grad.shape}; expected the shape of the last call's output {shape}"
        )
    if grad.dtype != view.x.dtype:
        grad = grad.astype(view.x.dtype)
    dx = np.empty(shape, view.x.dtype)
    if view.virtual_batch_size is not None:
        grad_k, dx_k = (ghost_view(a, view.virtual_batch_size) for a in (grad, dx))
    else:
        grad_k, dx_k = grad, dx
    ones, zeros = np.ones(channels), np.zeros(channels)
    r, d, adjust_scale, adjust_bias = (
        default if value is None else value
        for value, default in ((record.r, ones), (record.d, zeros),
                               (record.adjust_scale, ones), (record.adjust_bias, zeros))
    )
    gamma = ones if record.gamma is None else record.gamma
    gamma_r, gamma_one = r * adjust_scale, d * adjust_scale
    dx_scale = np.tile(gamma * gamma_r, view.ghosts)
    core_args = (view.axes, view.mask, record.mean, record.variance)
    if record.allreduce is None:
        sum_dy, sum_dy_xhat = _core.backward(
            grad_k, view.x, dx_k, *core_args, dx_scale, epsilon, record.through_stats
        )
    else:
        # one collective of (count, Σdy, Σdy·x̂); dγ and dβ stay this rank's.
        local = _core.backward_sums(grad_k, view.x, *core_args, epsilon)
        total = sum_across_ranks(record.allreduce, local.copy())
        _core.backward_apply(grad_k, view.x, dx_k, *core_args, dx_scale, epsilon, total)
        sum_dy, sum_dy_xhat = np.split(local, 3)[1:]
    # ∂y/∂γ = (x̂·r + d)·a_scale + a_bias; each ghost batch adds its sums.
    per_channel = (view.ghosts, channels)  # -1 cannot be inferred when C = 0
    sum_dy = sum_dy.reshape(per_channel).sum(axis=0)
    sum_dy_xhat = sum_dy_xhat.reshape(per_channel).sum(axis=0)
    per_weight = {
        "gamma": gamma_r * sum_dy_xhat + (gamma_one + adjust_bias) * sum_dy,
        "beta": sum_dy,
    }
    return dx, per_weight
