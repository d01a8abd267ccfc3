"""Drop-in replacements for torch's batch normalization modules on cbn's kernels.

Each class subclasses its torch counterpart and replaces only ``forward``, so the
constructors, parameters, buffers, ``state_dict`` layout, ``reset_parameters`` and
``repr`` are torch's own; the forward calls the ``torch.ops.cbn`` operators.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .. import _core
from ._epilogue_ops import Epilogue, infer_act, train_act
from ._ops import Statistics, as_numpy, infer, train
from ._sync import sync_batch_norm_train

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "convert"]

_CHANNELS = [1]


def _check_features(module: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> int:
    """The number of values per channel; errors before any buffer changes."""
    if x.shape[1] != module.num_features:
        raise ValueError(
            f"expected {module.num_features} channels (dimension 1) in the input of "
            f"{type(module).__name__}({module.num_features}); received shape {tuple(x.shape)}"
        )
    per_channel = x.numel() // module.num_features
    if module.training and per_channel <= 1:
        raise ValueError(
            f"expected more than 1 value per channel when training; received input of "
            f"shape {tuple(x.shape)}"
        )
    return per_channel


def running_average(
    running_mean: torch.Tensor, running_var: torch.Tensor, mean: Statistics, var: Statistics,
    count: int, momentum: float | None, tracked: torch.Tensor | None = None,
) -> None:
    """torch's update of the running statistics after a batch of ``count`` values per
    channel with ``mean`` and biased ``var``: ``tracked`` (``num_batches_tracked``; None
    for the functional form) += 1, then each of the mean and the unbiased variance moves
    toward the batch's by ``momentum`` or, with ``momentum=None``, by ``1 / tracked`` (a
    cumulative average).

    The eager path's float64 statistics update the buffers through NumPy views, in float64
    as torch's CPU kernel computes it: float32/float64 buffers in one core call (as many
    small torch or NumPy ops cost tens of microseconds), others with NumPy; the buffers'
    version counters are then bumped as an in-place torch op bumps them. A traced
    operator's tensors take torch ops."""
    assert momentum is not None or tracked is not None, "momentum=None needs tracked"
    unbiased = count / (count - 1)
    buffers = [running_mean, running_var] + ([] if tracked is None else [tracked])
    if isinstance(mean, np.ndarray):
        views = [as_numpy(b, output=True) for b in buffers]
        if not _core.running_average_fast(views[0], views[1], views[2] if tracked is not None
                                          else None, mean, var, unbiased, momentum):
            _update(views, mean, var, unbiased, momentum)
        torch.autograd.graph.increment_version(buffers)
    else:
        _update(buffers, mean, var, unbiased, momentum)


def _update(runnings: list[Any], mean: Statistics, var: Statistics, unbiased: float,
            momentum: float | None) -> None:
    """:func:`running_average`'s arithmetic on ``runnings`` — the running mean, variance
    and, if tracked, the batch count — as tensors or NumPy views."""
    batches = None
    if len(runnings) == 3:
        runnings[2][()] += 1  # a scalar add: a 0-d NumPy ufunc costs several times more
        batches = runnings[2]
    _move(runnings[0], _values(mean), momentum, batches)
    _move(runnings[1], _values(var) * unbiased, momentum, batches)


def _values(statistics: Statistics) -> Any:
    """Statistics to compute with: a tensor detached (no graph into the buffers)."""
    return statistics.detach() if isinstance(statistics, torch.Tensor) else statistics


def _move(running: Any, batch: Any, momentum: float | None, batches: Any) -> None:
    """``running`` (a buffer, or its NumPy view) moved in place toward ``batch`` by
    ``momentum``, or by ``1 / batches`` when ``momentum`` is None."""
    weight = 1 / batches if momentum is None else momentum
    running[...] = running * (1 - weight) + batch * weight


_MISSING = object()


def _state(module: Any, store: dict[str, Any], name: str) -> Any:
    """``getattr(module, name)`` of a parameter or buffer, as a lookup in its ``store``
    (``module._parameters`` or ``_buffers``; through ``Module.__getattr__`` each name costs
    about a microsecond), or getattr when a parametrization or pruning moved it."""
    value = store.get(name, _MISSING)
    return getattr(module, name) if value is _MISSING else value


def _update_running_stats(module: Any, mean: Statistics, var: Statistics, count: int) -> None:
    """A module's running statistics and ``num_batches_tracked`` after a batch."""
    buffers = module._buffers
    running_average(_state(module, buffers, "running_mean"),
                    _state(module, buffers, "running_var"), mean, var, count, module.momentum,
                    _state(module, buffers, "num_batches_tracked"))


def _batch_norm(
    module: Any, x: torch.Tensor, sync_group: object = None, epilogue: Epilogue | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The forward shared by every module; ``sync_group`` is set when the batch
    statistics are to be reduced across the ranks of a process group; ``epilogue`` (and
    ``residual``) make the output ``act(bn(x) + residual)`` (not with ``sync_group``)."""
    per_channel = _check_features(module, x)
    weight = _state(module, module._parameters, "weight")
    bias = _state(module, module._parameters, "bias")
    running_mean = _state(module, module._buffers, "running_mean")
    if not module.training and running_mean is not None:
        stats = (x, running_mean, _state(module, module._buffers, "running_var"), weight, bias,
                 _CHANNELS, module.eps)
        return infer(*stats) if epilogue is None else infer_act(*stats, epilogue, residual)
    if sync_group is None:
        y, mean, var = (
            train(x, weight, bias, _CHANNELS, module.eps) if epilogue is None
            else train_act(x, weight, bias, _CHANNELS, module.eps, None, epilogue, residual))
    else:
        y, mean, var, per_channel = sync_batch_norm_train(x, module, sync_group)
    if module.training and module.track_running_stats:
        _update_running_stats(module, mean, var, per_channel)
    return y


class BatchNorm1d(nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on cbn's kernels: inputs ``(N, C)`` or ``(N, C, L)``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return _batch_norm(self, input)


class BatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on cbn's kernels: inputs ``(N, C, H, W)``, contiguous or
    channels_last (the output keeps the input's memory format)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return _batch_norm(self, input)


class BatchNorm3d(nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on cbn's kernels: inputs ``(N, C, D, H, W)``, contiguous
    or channels_last_3d."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        return _batch_norm(self, input)


class SyncBatchNorm(nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` on CPU: in training, the batch statistics are those of
    the union of every rank's batch (exact for uneven batches), reduced with one
    ``torch.distributed`` all_reduce in the forward and one in the backward. Without an
    initialized process group of more than one rank it is a plain batch norm."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        group = self.process_group or torch.distributed.group.WORLD
        synchronized = (
            self.training and torch.distributed.is_available()
            and torch.distributed.is_initialized()
            and torch.distributed.get_world_size(group) > 1
        )
        return _batch_norm(self, input, group if synchronized else None)


_REPLACEMENTS = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
}


def convert(module: nn.Module) -> nn.Module:
    """Make every ``torch.nn.BatchNorm{1,2,3}d`` and ``SyncBatchNorm`` in ``module``
    (itself included, recursively, in place) run on cbn, and return ``module``.

    Each module keeps its identity, parameters, buffers, hooks, mode, device and dtype
    (an optimizer built before the conversion still holds the same parameters): only its
    class becomes the cbn subclass, which differs in ``forward`` alone. Subclasses of
    torch's modules (``LazyBatchNorm2d``, user classes) are left as they are.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module; received {type(module).__name__}")
    for sub in module.modules():
        replacement = _REPLACEMENTS.get(type(sub))
        if replacement is not None:
            sub.__class__ = replacement
    return module
