"""``cbn.torch.fold``: batch normalizations merged into the convolution or linear
layer before them, for inference."""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from .. import ops
from ._bn_act import _BatchNormAct
from ._ops import as_numpy

__all__ = ["fold"]

_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class _LeafTracer(fx.Tracer):
    """fx's tracer, with the layers and norms as leaves also when they are subclasses
    defined outside torch.nn (cbn.torch's modules, a user's own)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _LINEAR + _NORMS) or super().is_leaf_module(m, module_qualified_name)


def _traced_pairs(model: nn.Module) -> list[tuple[str, str]] | None:
    """(layer, norm) qualified names where the norm's only input is the layer's output and
    that output goes nowhere else; None when the model cannot be traced symbolically."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # any Python the tracer cannot follow: fall back to Sequentials
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs = []
    for node in graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if (isinstance(source, fx.Node) and source.op == "call_module"
                and len(source.users) == 1 and calls[str(source.target)] == 1
                and calls[str(node.target)] == 1):
            pairs.append((str(source.target), str(node.target)))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, norm) names of neighbours inside every nn.Sequential of the model."""
    pairs = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            dotted = (prefix + "." if prefix else "")
            pairs += [(dotted + a, dotted + b) for a, b in zip(names, names[1:], strict=False)]
    return pairs


def _fold_pair(model: nn.Module, layer: Any, norm_name: str, norm: Any) -> None:
    with torch.no_grad():
        weight = layer.weight.detach()
        new_weight, new_bias = ops.fold(
            as_numpy(weight), None if layer.bias is None else as_numpy(layer.bias),
            as_numpy(norm.running_mean), as_numpy(norm.running_var),
            gamma=None if norm.weight is None else as_numpy(norm.weight),
            beta=None if norm.bias is None else as_numpy(norm.bias), epsilon=norm.eps, axis=0)
        layer.weight.copy_(torch.from_numpy(new_weight))
        bias = torch.from_numpy(new_bias).to(weight.dtype)
        if layer.bias is None:
            layer.bias = nn.Parameter(bias, requires_grad=layer.weight.requires_grad)
        else:
            layer.bias.copy_(bias)
    parent_name, _, child = norm_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, nn.Identity())


def fold(model: nn.Module) -> nn.Module:
    """Merge every batch normalization that directly follows a ``Conv1d/2d/3d`` or
    ``Linear`` into that layer's weight and bias (in place), replace it with
    ``nn.Identity``, and return ``model``; inference only (``model.eval()`` first).

    Pairs are found with ``torch.fx`` tracing (the convolution's output must feed only the
    batch norm, and each module must be called once); a model ``fx`` cannot trace is
    searched for neighbours inside its ``nn.Sequential`` containers. Batch norms without
    running statistics (``track_running_stats=False``), on other devices than the CPU,
    after any other module, or with a fused activation (``BatchNormAct1d/2d/3d``) are
    left as they are. The folded model computes the same outputs to rounding (float64
    factors).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold expects a torch.nn.Module; received {type(model).__name__}")
    modules = dict(model.named_modules())
    pairs = _traced_pairs(model)
    foldable = []
    for layer_name, norm_name in _sequential_pairs(model) if pairs is None else pairs:
        layer, norm = modules.get(layer_name), modules.get(norm_name)
        if (isinstance(layer, _LINEAR) and isinstance(norm, _NORMS)
                and not isinstance(norm, _BatchNormAct) and norm.running_mean is not None
                and layer.weight.device.type == "cpu"
                and layer.weight.shape[0] == norm.num_features):
            foldable.append((layer, norm_name, norm))
    training = [name for _, name, norm in foldable if norm.training]
    if training:
        raise ValueError(
            f"fold is for inference: {', '.join(training)} in training mode (call "
            "model.eval() first); nothing was changed")
    for layer, norm_name, norm in foldable:
        _fold_pair(model, layer, norm_name, norm)
    return model
