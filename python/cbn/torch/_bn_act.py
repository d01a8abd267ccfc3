"""Batch normalization fused with an activation and a residual add:
``cbn.torch.BatchNormAct1d/2d/3d`` and ``cbn.torch.batch_norm_act``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._epilogue_ops import Epilogue, epilogue, infer_act, train_act
from .modules import _CHANNELS, _batch_norm, running_average

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "batch_norm_act"]


def activation_attributes(activation: str = "relu", negative_slope: float = 0.01,
                          min_val: float = -1.0, max_val: float = 1.0) -> dict[str, Any]:
    """The attributes a BatchNormAct module has for its activation keywords, checked."""
    return {"_epilogue": epilogue(activation, negative_slope, min_val, max_val),
            "activation": activation, "negative_slope": negative_slope, "min_val": min_val,
            "max_val": max_val}


class _BatchNormAct:
    """``act(bn(input) + residual)`` in one sweep over the data (mixed into torch's
    batch norm classes: their constructor, parameters, buffers and ``state_dict``)."""

    _epilogue: Epilogue
    activation: str
    negative_slope: float
    min_val: float
    max_val: float

    def __init__(self, *args: Any, activation: str = "relu", negative_slope: float = 0.01,
                 min_val: float = -1.0, max_val: float = 1.0, **kwargs: Any) -> None:
        attributes = activation_attributes(activation, negative_slope, min_val, max_val)
        super().__init__(*args, **kwargs)
        self.__dict__.update(attributes)

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor:
        """``act(bn(input) + residual)``; ``residual`` (None: no add) has the input's
        shape and is read in its dtype."""
        self._check_input_dim(input)  # type: ignore[attr-defined]
        return _batch_norm(self, input, epilogue=self._epilogue, residual=residual)

    def extra_repr(self) -> str:
        options = {"leaky_relu": f", negative_slope={self.negative_slope}",
                   "hardtanh": f", min_val={self.min_val}, max_val={self.max_val}"}
        base: str = super().extra_repr()  # type: ignore[misc]
        return base + f", activation={self.activation!r}" + options.get(self.activation, "")


class BatchNormAct1d(_BatchNormAct, nn.BatchNorm1d):
    """``act(BatchNorm1d(input) + residual)``: inputs ``(N, C)`` or ``(N, C, L)``.
    Constructor: torch's ``nn.BatchNorm1d`` plus the keywords ``activation`` (one of
    ``cbn.torch.ACTIVATIONS``: relu, relu6, leaky_relu, hardtanh, silu, gelu_tanh, identity),
    ``negative_slope`` (leaky_relu) and ``min_val``/``max_val`` (hardtanh), kept as
    attributes of those names (set at construction: changing them later has no effect)."""


class BatchNormAct2d(_BatchNormAct, nn.BatchNorm2d):
    """``act(BatchNorm2d(input) + residual)``: inputs ``(N, C, H, W)``, contiguous or
    channels_last (the output keeps the input's memory format); constructor as
    :class:`BatchNormAct1d`'s."""


class BatchNormAct3d(_BatchNormAct, nn.BatchNorm3d):
    """``act(BatchNorm3d(input) + residual)``: inputs ``(N, C, D, H, W)``, contiguous
    or channels_last_3d; constructor as :class:`BatchNormAct1d`'s."""


def _check_functional(input: torch.Tensor, running_mean: torch.Tensor | None,
                      running_var: torch.Tensor | None, training: bool) -> int:
    """The number of values per channel; errors before any buffer changes."""
    if input.dim() < 2:
        raise ValueError(f"expected an input (N, C, ...) of at least 2 dimensions; received "
                         f"shape {tuple(input.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither")
    per_channel = input.numel() // max(input.shape[1], 1)
    if training and per_channel <= 1:
        raise ValueError(f"expected more than 1 value per channel when training; received "
                         f"input of shape {tuple(input.shape)}")
    return per_channel


def batch_norm_act(
    input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
    training: bool = False, momentum: float = 0.1, eps: float = 1e-5, *,
    activation: str = "relu", residual: torch.Tensor | None = None,
    negative_slope: float = 0.01, min_val: float = -1.0, max_val: float = 1.0,
) -> torch.Tensor:
    """``act(F.batch_norm(input, ...) + residual)`` in one sweep; the arguments before
    ``*`` are ``torch.nn.functional.batch_norm``'s (channels on dimension 1). In
    training the batch statistics are used and ``running_mean``/``running_var``, when
    given, updated in place with ``momentum`` (as torch's functional does); otherwise
    the running statistics are used. ``activation`` is one of ``cbn.torch.ACTIVATIONS``;
    ``residual`` (None: no add) has the input's shape."""
    ep = epilogue(activation, negative_slope, min_val, max_val)
    per_channel = _check_functional(input, running_mean, running_var, training)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when not training")
        return infer_act(input, running_mean, running_var, weight, bias, _CHANNELS, eps, ep,
                         residual)
    y, mean, var = train_act(input, weight, bias, _CHANNELS, eps, None, ep, residual)
    if running_mean is not None and running_var is not None:
        running_average(running_mean, running_var, mean, var, per_channel, momentum)
    return y

