"""``cbn.torch.fuse``: batch norm → (add →) activation chains of a model replaced by one
fused ``BatchNormAct`` call, found with ``torch.fx``."""

from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import modules as _modules
from ._bn_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, activation_attributes
from ._fold import _LeafTracer

__all__ = ["fuse"]

# torch's batch norms and cbn's drop-ins (exact types: subclasses are left alone), and
# the fused class and the cbn class each becomes.
_NORMS: dict[type, tuple[type, type]] = {
    nn.BatchNorm1d: (BatchNormAct1d, _modules.BatchNorm1d),
    nn.BatchNorm2d: (BatchNormAct2d, _modules.BatchNorm2d),
    nn.BatchNorm3d: (BatchNormAct3d, _modules.BatchNorm3d),
    _modules.BatchNorm1d: (BatchNormAct1d, _modules.BatchNorm1d),
    _modules.BatchNorm2d: (BatchNormAct2d, _modules.BatchNorm2d),
    _modules.BatchNorm3d: (BatchNormAct3d, _modules.BatchNorm3d),
}
_ADDS = (operator.add, operator.iadd, torch.add)

# Activation functions: (activation, names of the arguments after the input).
_FUNCTIONS: dict[Any, tuple[str, tuple[str, ...]]] = {
    F.relu: ("relu", ("inplace",)), torch.relu: ("relu", ()), torch.relu_: ("relu", ()),
    F.relu6: ("relu6", ("inplace",)), F.silu: ("silu", ("inplace",)),
    F.leaky_relu: ("leaky_relu", ("negative_slope", "inplace")),
    F.hardtanh: ("hardtanh", ("min_val", "max_val", "inplace")),
    F.gelu: ("gelu", ("approximate",)),
}
_METHODS = {"relu": "relu", "relu_": "relu"}


def _module_activation(m: nn.Module) -> dict[str, Any] | None:
    """The BatchNormAct keywords computing module ``m``, or None."""
    kind = type(m)
    if kind in (nn.ReLU, nn.ReLU6, nn.SiLU):
        return {"activation": {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu"}[kind]}
    if kind is nn.LeakyReLU:
        return {"activation": "leaky_relu", "negative_slope": m.negative_slope}
    if kind is nn.Hardtanh:
        return {"activation": "hardtanh", "min_val": m.min_val, "max_val": m.max_val}
    if kind is nn.GELU and m.approximate == "tanh":
        return {"activation": "gelu_tanh"}
    return None


def _function_activation(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
                         ) -> dict[str, Any] | None:
    """The BatchNormAct keywords of a call to an activation function, or None."""
    if target not in _FUNCTIONS or len(args) > 1 + len(_FUNCTIONS[target][1]):
        return None
    name, params = _FUNCTIONS[target]
    options = {**dict(zip(params, args[1:], strict=False)), **kwargs}
    options.pop("inplace", None)  # its input has no other user
    if any(isinstance(v, fx.Node) or k not in params for k, v in options.items()):
        return None
    if name == "gelu":
        return {"activation": "gelu_tanh"} if options == {"approximate": "tanh"} else None
    return {"activation": name, **options}


def _activation(node: fx.Node, source: fx.Node, modules: dict[str, nn.Module]
                ) -> dict[str, Any] | None:
    """The BatchNormAct keywords if ``node`` applies an activation to ``source``."""
    if not node.args or node.args[0] is not source:
        return None
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        return _module_activation(modules[str(node.target)])
    if node.op == "call_function":
        return _function_activation(node.target, node.args, dict(node.kwargs))
    if node.op == "call_method" and node.target in _METHODS and len(node.args) == 1:
        return None if node.kwargs else {"activation": _METHODS[str(node.target)]}
    return None


def _residual(add: fx.Node, bn: fx.Node) -> fx.Node | None:
    """The other tensor of ``bn + other`` (``bn += other``), or None."""
    if add.op != "call_function" or add.target not in _ADDS or add.kwargs or len(add.args) != 2:
        return None
    a, b = add.args
    other = b if a is bn else a
    in_place = add.target is operator.iadd
    if (a is bn) == (b is bn) or not isinstance(other, fx.Node) or (in_place and a is not bn):
        return None  # bn + bn, a constant, or an add that writes into the residual
    return other


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _chain(bn: fx.Node, modules: dict[str, nn.Module]
           ) -> tuple[list[fx.Node], fx.Node | None, dict[str, Any]] | None:
    """(nodes from bn's user to the activation, residual, keywords) of a fusable chain."""
    user = _only_user(bn)
    if user is None:
        return None
    options = _activation(user, bn, modules)
    if options is not None:
        return [user], None, options
    residual, act = _residual(user, bn), _only_user(user)
    if residual is None or act is None:
        return None
    options = _activation(act, user, modules)
    return None if options is None else ([user, act], residual, options)


def _norm_calls(graph: fx.Graph, modules: dict[str, nn.Module]) -> list[fx.Node]:
    """The call of every batch norm fuse handles that the graph calls once, on one input."""
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and type(modules[str(node.target)]) in _NORMS:
            calls.setdefault(str(node.target), []).append(node)
    return [nodes[0] for nodes in calls.values()
            if len(nodes) == 1 and len(nodes[0].args) == 1 and not nodes[0].kwargs]


def _sharing(norm: nn.Module, cls: type, **options: Any) -> nn.Module:
    """A module of class ``cls`` with ``norm``'s parameters, buffers and mode (the same
    tensors, in the same dictionaries); ``options`` are BatchNormAct's keywords."""
    new = copy.copy(norm)  # a new __dict__ holding the same _parameters and _buffers
    new.__class__ = cls
    if options:
        new.__dict__.update(activation_attributes(**options))
    return new


def _fuse_chain(gm: fx.GraphModule, bn: fx.Node, chain: list[fx.Node],
                residual: fx.Node | None, options: dict[str, Any]) -> None:
    name = str(bn.target)
    fused_cls = _NORMS[type(gm.get_submodule(name))][0]
    _replace(gm, name, _sharing(gm.get_submodule(name), fused_cls, **options))
    act = chain[-1]
    with gm.graph.inserting_before(act):
        args = (bn.args[0],) if residual is None else (bn.args[0], residual)
        fused = gm.graph.call_module(name, args)
    act.replace_all_uses_with(fused)
    for node in [*reversed(chain), bn]:
        gm.graph.erase_node(node)


def _replace(gm: fx.GraphModule, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(gm.get_submodule(parent), child, module)


def fuse(model: nn.Module) -> fx.GraphModule:
    """``model`` as a ``torch.fx.GraphModule`` in which every batch norm → activation and
    batch norm → add → activation chain is one fused ``BatchNormAct1d/2d/3d`` call
    (``act(bn(x) + residual)`` in one sweep) and every other batch norm runs on cbn.

    A chain starts at an ``nn.BatchNorm1d/2d/3d`` (torch's or cbn's, called once in the
    graph) whose output goes only to an activation, or only to an add with another tensor
    (``+``, ``+=`` into the batch norm's output, ``torch.add`` without ``alpha``) whose
    result goes only to an activation. Activations: ``nn.ReLU``, ``F.relu``,
    ``torch.relu``, ``Tensor.relu``; ``nn.ReLU6``, ``F.relu6``; ``nn.SiLU``, ``F.silu``;
    ``nn.LeakyReLU``, ``F.leaky_relu``; ``nn.Hardtanh``, ``F.hardtanh``;
    ``nn.GELU(approximate="tanh")``, ``F.gelu(approximate="tanh")``. Everything else is
    left as it is.

    ``model`` is traced with ``torch.fx`` (convolutions, linear layers and batch norms as
    leaves; a model it cannot trace raises fx's error) and not modified: the returned
    module calls the model's other submodules, and its batch norms (fused or not) are new
    modules under the same names that share the model's parameter and buffer tensors, in
    the model's modes. So ``state_dict`` has the model's keys, an optimizer over
    ``model.parameters()`` trains it, and the running statistics it updates are the
    model's. Switch modes on the returned module.
    The outputs are the model's to rounding, the running statistics the same.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse expects a torch.nn.Module; received {type(model).__name__}")
    tracer = _LeafTracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.training = model.training
    modules = dict(gm.named_modules())
    for bn in _norm_calls(gm.graph, modules):
        chain = _chain(bn, modules)
        if chain is not None:
            _fuse_chain(gm, bn, *chain)
    for name, module in dict(gm.named_modules()).items():
        if type(module) in _NORMS and not isinstance(module, _NORMS[type(module)][1]):
            _replace(gm, name, _sharing(module, _NORMS[type(module)][1]))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm
