"""Drop-in replacements for torch's batch normalization modules on cbn's kernels.

Each class subclasses its torch counterpart and replaces only ``forward``, so the
constructors, parameters, buffers, ``state_dict`` layout, ``reset_parameters`` and
``repr`` are torch's own; the forward calls the ``torch.ops.cbn`` operators.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._epilogue_ops import Epilogue, infer_act, train_act
from ._ops import infer, train
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
    running_mean: torch.Tensor, running_var: torch.Tensor, mean: torch.Tensor,
    var: torch.Tensor, count: int, momentum: float | None, tracked: torch.Tensor | None = None,
) -> None:
    """torch's update of the running statistics with a batch's mean and biased variance
    over ``count`` values: exponential (``momentum``) or, with ``momentum=None``,
    cumulative over ``tracked`` batches, of the mean and the unbiased variance."""
    mean, var = mean.detach(), var.detach()
    if mean.dtype != running_mean.dtype:
        mean, var = mean.to(running_mean.dtype), var.to(running_var.dtype)
    unbiased = count / (count - 1)
    if momentum is None:
        assert tracked is not None, "momentum=None needs the count of batches tracked"
        running_mean.add_((mean - running_mean) / tracked)
        running_var.add_((var * unbiased - running_var) / tracked)
    else:
        running_mean.lerp_(mean, momentum)
        running_var.mul_(1 - momentum).add_(var, alpha=momentum * unbiased)


def _update_running_stats(
    module: Any, mean: torch.Tensor, var: torch.Tensor, count: int
) -> None:
    """A module's running statistics and ``num_batches_tracked`` after a batch."""
    buffers = module._buffers  # one lookup instead of three through Module.__getattr__
    tracked = buffers["num_batches_tracked"]
    tracked.add_(1)
    running_average(buffers["running_mean"], buffers["running_var"], mean, var, count,
                    module.momentum, tracked)


def _batch_norm(
    module: Any, x: torch.Tensor, sync_group: object = None, epilogue: Epilogue | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """The forward shared by every module; ``sync_group`` is set when the batch
    statistics are to be reduced across the ranks of a process group; ``epilogue`` (and
    ``residual``) make the output ``act(bn(x) + residual)`` (not with ``sync_group``)."""
    per_channel = _check_features(module, x)
    if not module.training and module.running_mean is not None:
        stats = (x, module.running_mean, module.running_var, module.weight, module.bias,
                 _CHANNELS, module.eps)
        return infer(*stats) if epilogue is None else infer_act(*stats, epilogue, residual)
    if sync_group is None:
        y, mean, var = (
            train(x, module.weight, module.bias, _CHANNELS, module.eps) if epilogue is None
            else train_act(x, module.weight, module.bias, _CHANNELS, module.eps, None, epilogue,
                           residual))
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
