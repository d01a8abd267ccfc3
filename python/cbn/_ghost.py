"""Ghost batch normalization (``virtual_batch_size``): the strided ghost-batch views
the core reads in place, and the per-channel averages of the ghost statistics.

See "Ghost batch normalization" in ``docs/behaviour.md``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

__all__ = ["KernelView", "check_ghost_axes", "ghost_view", "kernel_view", "ghost_averages"]


class KernelView(NamedTuple):
    """The arrays and kept axes a training call hands to the core.

    With ``virtual_batch_size`` these are the ghost views and the kept axes are the
    ghost axis 1 plus the channel axes shifted by one, so the core computes statistics
    and normalizes per (ghost batch, channel); otherwise they are the call's own arrays.
    """

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray | None
    axes: tuple[int, ...]
    ghosts: int
    virtual_batch_size: int | None  # the ghost view's V; None: the arrays as called


def check_ghost_axes(axis: object, axes: tuple[int, ...], virtual_batch_size: int | None) -> None:
    """Ghost batches split axis 0, which therefore cannot be a normalized axis."""
    if virtual_batch_size is not None and 0 in axes:
        raise ValueError(
            f"axis={axis!r} normalizes axis 0, which virtual_batch_size="
            f"{virtual_batch_size} splits into ghost batches; choose other axes"
        )


def ghost_view(a: np.ndarray, virtual_batch_size: int) -> np.ndarray:
    """The ``(V, B/V, ...)`` view of ``a`` (batch first), without a copy.

    Element ``[i, g, ...]`` is sample ``i·(B/V) + g``: axis 1 indexes the ghost batch
    ``{b : b mod (B/V) = g}`` and axis 0 its members (tf.keras 2's reshape order). Any
    strides allow this view, unlike a reshape. A size-1 batch axis (a mask broadcast over
    the batch) stays broadcast.
    """
    if a.shape[0] == 1:
        return a[np.newaxis]
    ghosts = a.shape[0] // virtual_batch_size
    stride = a.strides[0]
    return as_strided(
        a, (virtual_batch_size, ghosts) + a.shape[1:], (stride * ghosts, stride) + a.strides[1:]
    )


def kernel_view(
    x: np.ndarray,
    y: np.ndarray,
    mask: np.ndarray | None,
    axes: tuple[int, ...],
    virtual_batch_size: int | None,
) -> KernelView:
    """The call's arrays as the core sees them: ghost views with ``virtual_batch_size``
    (a batch it does not divide raises ``ValueError``), else the arrays themselves."""
    size = virtual_batch_size
    if size is None:
        return KernelView(x, y, mask, axes, 1, None)
    if x.shape[0] % size:
        raise ValueError(
            f"virtual_batch_size={size} must divide the batch size in training; received "
            f"inputs of shape {x.shape} (batch size {x.shape[0]})"
        )
    return KernelView(
        ghost_view(x, size),
        ghost_view(y, size),
        None if mask is None else ghost_view(mask, size),
        (1,) + tuple(axis + 1 for axis in axes),
        x.shape[0] // size,
        size,
    )


def ghost_averages(
    mean: np.ndarray, variance: np.ndarray, ghosts: int, channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the averages over the ghost batches of their means and of their
    variances (given per (ghost, channel)). An empty batch has no ghost batch; like a
    channel without a used position its statistics are then 0."""
    if ghosts == 1:
        return mean, variance

    def average(values: np.ndarray) -> np.ndarray:
        total: np.ndarray = values.reshape(ghosts, channels).sum(axis=0)
        return total / max(ghosts, 1)

    return average(mean), average(variance)
