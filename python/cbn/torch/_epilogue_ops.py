"""Batch normalization fused with an activation and a residual add, as ``torch.library``
custom operators in the ``cbn`` namespace: ``y = act(bn(x) + residual)`` in one sweep.

Registered with :mod:`cbn.torch._ops` (same conventions: ``axes`` are the channel axes,
per-channel tensors have the channel shape or as many elements, CPU tensors of float16,
bfloat16, float32 or float64; fake implementations for ``torch.compile`` and
``torch.export``). ``activation`` is the core's code (:data:`ACTIVATIONS` maps names
to codes), ``alpha`` leaky_relu's negative slope, ``lo``/``hi`` hardtanh's bounds;
``residual`` (None: no add) has ``x``'s shape and is read in ``x``'s dtype.

- ``torch.ops.cbn.batch_norm_act_train(Tensor x, Tensor? weight, Tensor? bias,
  int[] axes, float eps, Tensor? mask, int activation, float alpha, float lo, float hi,
  Tensor? residual) -> (Tensor y, Tensor mean, Tensor var)``: as
  ``cbn::batch_norm_train``, with the epilogue applied to ``y``. Differentiable w.r.t.
  ``x``, ``weight``, ``bias`` and ``residual``.
- ``torch.ops.cbn.batch_norm_act_infer(Tensor x, Tensor mean, Tensor var,
  Tensor? weight, Tensor? bias, int[] axes, float eps, int activation, float alpha,
  float lo, float hi, Tensor? residual) -> Tensor y``: as ``cbn::batch_norm_infer``,
  with the epilogue.
- ``torch.ops.cbn.batch_norm_act_backward(Tensor dy, Tensor x, Tensor mean, Tensor var,
  Tensor? weight, Tensor? bias, int[] axes, float eps, Tensor? mask, bool training,
  int activation, float alpha, float lo, float hi, Tensor? residual, Tensor? output,
  bool need_dresidual) -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dresidual)``:
  with ``g = dy · act'(bn(x) + residual)``, ``dx`` through the normalization (through
  the batch statistics when ``training``), ``dweight = Σ g·x̂``, ``dbias = Σ g``
  (statistics dtype, channel shape) and ``dresidual = g`` (empty unless
  ``need_dresidual``). ``residual`` is the forward's (None: the identity, or no add).
  With ``output`` (the forward's ``y``) and a residual, a piecewise-linear activation
  reads its derivative from ``output``, as torch's relu backward does, instead of
  recomputing ``bn(x) + residual``. Not differentiable itself.

The forward ops save ``y`` for the backward only for piecewise-linear activations
(relu, relu6, hardtanh, leaky_relu with a non-negative slope); the others recompute
``bn(x) + residual``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .. import _core
from .._epilogue import ACTIVATIONS as _CORE_CODES
from ._ops import (
    Channels,
    Geometry,
    Statistics,
    _apply,
    _fake_stats,
    _geometry,
    _mask,
    _meta,
    _needs_graph,
    _param_grad,
    _stats,
    _traced,
    _with_stats,
    as_channels,
    as_numpy,
    infer_core,
    like_input,
    train_core,
)

__all__ = ["ACTIVATIONS", "Epilogue", "epilogue", "train_act", "infer_act"]

Tensor = torch.Tensor

#: Activation names (torch's) and the core's codes.
ACTIVATIONS: dict[str, int] = {
    "identity": _CORE_CODES["identity"], "relu": _CORE_CODES["relu"],
    "relu6": _CORE_CODES["relu6"], "leaky_relu": _CORE_CODES["leaky_relu"],
    "hardtanh": _CORE_CODES["clip"], "silu": _CORE_CODES["silu"],
    "gelu_tanh": _CORE_CODES["gelu_tanh"],
}
_IDENTITY, _LEAKY, _CLIP = (ACTIVATIONS[n] for n in ("identity", "leaky_relu", "hardtanh"))
_PIECEWISE = {ACTIVATIONS[n] for n in ("relu", "relu6", "hardtanh")}


class Epilogue(NamedTuple):
    """An activation as the operators take it: the core's code and its parameters."""

    activation: int
    alpha: float = 0.0
    lo: float = 0.0
    hi: float = 0.0


def epilogue(activation: str, negative_slope: float = 0.01, min_val: float = -1.0,
             max_val: float = 1.0) -> Epilogue:
    """The :class:`Epilogue` of an activation name (:data:`ACTIVATIONS`), checked:
    ``negative_slope`` finite for leaky_relu, ``min_val <= max_val`` for hardtanh (each
    ignored by the other activations)."""
    code = ACTIVATIONS.get(activation) if isinstance(activation, str) else None
    if code is None:
        raise ValueError(
            f"activation={activation!r} is not an activation cbn fuses; expected one of "
            + ", ".join(repr(n) for n in ACTIVATIONS))
    slope, lo, hi = float(negative_slope), float(min_val), float(max_val)
    if code == _LEAKY and not math.isfinite(slope):
        raise ValueError(f"negative_slope must be finite; received {negative_slope!r}")
    if code == _CLIP and not lo <= hi:  # also catches NaN
        raise ValueError(f"hardtanh needs min_val <= max_val; received {min_val!r}, {max_val!r}")
    return Epilogue(code, slope, lo, hi)


def _reads_output(activation: int, alpha: float) -> bool:
    """Whether act' is a function of act's output (then the backward reads that)."""
    return activation in _PIECEWISE or (activation == _LEAKY and alpha >= 0.0)


def _core_epilogue(x: Tensor, epilogue: Epilogue, residual: Tensor | None) -> tuple:
    """The core's epilogue tuple; ``residual`` checked to have ``x``'s shape, in its dtype."""
    res = None if residual is None else as_numpy(like_input(residual, x, "residual"))
    activation, alpha, lo, hi = epilogue
    return int(activation), float(alpha), float(lo), float(hi), res


def _act_train_impl(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, axes: list[int], eps: float,
    mask: Tensor | None, activation: int, alpha: float, lo: float, hi: float,
    residual: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    geometry = _geometry(x, axes)
    ep = _core_epilogue(x, Epilogue(activation, alpha, lo, hi), residual)
    return _with_stats(x, geometry, train_core(x, weight, bias, geometry, eps, mask, ep))


def _act_infer_impl(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
    axes: list[int], eps: float, activation: int, alpha: float, lo: float, hi: float,
    residual: Tensor | None,
) -> Tensor:
    geometry = _geometry(x, axes)
    ep = _core_epilogue(x, Epilogue(activation, alpha, lo, hi), residual)
    return infer_core(x, mean, var, weight, bias, geometry, eps, ep)[0]


def act_backward_core(
    dy: Tensor, x: Tensor, channels: Channels, geometry: Geometry, eps: float,
    mask: Tensor | None, training: bool, epilogue: Epilogue, residual: Tensor | None,
    output: Tensor | None, need_dresidual: bool,
) -> tuple[Tensor, np.ndarray, np.ndarray, Tensor]:
    """``dx``, the float64 weight and bias gradients and ``dresidual`` (empty unless
    ``need_dresidual``) of the forward that had ``channels``; ``dy`` and ``output`` (the
    forward's ``y`` or None) have ``x``'s shape and dtype."""
    out = None if output is None else as_numpy(output)
    dx = torch.empty_like(x)
    dres = torch.empty_like(x) if need_dresidual else x.new_empty(0)
    sum_dy, sum_dy_xhat = _core.backward_epilogue(
        as_numpy(dy), as_numpy(x), as_numpy(dx, output=True), geometry.axes, _mask(mask, x),
        *channels, float(eps), bool(training), _core_epilogue(x, epilogue, residual), out,
        as_numpy(dres, output=True) if need_dresidual else None)
    return dx, sum_dy_xhat, sum_dy, dres


def _act_backward_impl(
    dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
    bias: Tensor | None, axes: list[int], eps: float, mask: Tensor | None, training: bool,
    activation: int, alpha: float, lo: float, hi: float, residual: Tensor | None,
    output: Tensor | None, need_dresidual: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    geometry = _geometry(x, axes)
    dy = like_input(dy, x, "dy")
    output = None if output is None else like_input(output, x, "output")
    channels = as_channels(geometry, mean, var, weight, bias)
    dx, dweight, dbias, dres = act_backward_core(
        dy, x, channels, geometry, eps, mask, training, Epilogue(activation, alpha, lo, hi),
        residual, output, need_dresidual)
    return dx, _stats(dweight, x, geometry.shape), _stats(dbias, x, geometry.shape), dres


batch_norm_act_train = torch.library.custom_op("cbn::batch_norm_act_train", _act_train_impl,
                                               mutates_args=())
batch_norm_act_infer = torch.library.custom_op("cbn::batch_norm_act_infer", _act_infer_impl,
                                               mutates_args=())
batch_norm_act_backward = torch.library.custom_op(
    "cbn::batch_norm_act_backward", _act_backward_impl, mutates_args=())


def _fake_output(x: Tensor, axes: list[int], residual: Tensor | None) -> Tensor:
    """The output's fake, after the checks the real operator makes first."""
    _geometry(x, axes)
    if residual is not None:
        like_input(residual, x, "residual")
    return torch.empty_like(x)


@batch_norm_act_train.register_fake
def _(x, weight, bias, axes, eps, mask, activation, alpha, lo, hi, residual):
    return _fake_output(x, axes, residual), _fake_stats(x, axes), _fake_stats(x, axes)


@batch_norm_act_infer.register_fake
def _(x, mean, var, weight, bias, axes, eps, activation, alpha, lo, hi, residual):
    return _fake_output(x, axes, residual)


@batch_norm_act_backward.register_fake
def _(dy, x, mean, var, weight, bias, axes, eps, mask, training, activation, alpha, lo, hi,
      residual, output, need_dresidual):
    dres = torch.empty_like(x) if need_dresidual else x.new_empty(0)
    return torch.empty_like(x), _fake_stats(x, axes), _fake_stats(x, axes), dres


def _save(ctx, x, mean, var, weight, bias, mask, residual, y, epilogue: Epilogue) -> None:
    """What the backward needs: the residual (the identity needs none) and, for
    piecewise-linear activations, ``y`` (mean and var: None on the eager path, which keeps
    the float64 statistics instead)."""
    identity = epilogue.activation == _IDENTITY
    reads_output = _reads_output(epilogue.activation, epilogue.alpha)
    ctx.save_for_backward(x, mean, var, weight, bias, mask, None if identity else residual,
                          y if reads_output else None)
    ctx.metas = (_meta(weight), _meta(bias))
    ctx.epilogue = epilogue


def _setup_train(ctx, inputs, output):
    x, weight, bias, axes, eps, mask, activation, alpha, lo, hi, residual = inputs
    y, mean, var = output
    _save(ctx, x, mean, var, weight, bias, mask, residual, y,
          Epilogue(activation, alpha, lo, hi))
    ctx.axes, ctx.eps = axes, eps


def _setup_infer(ctx, inputs, output):
    x, mean, var, weight, bias, axes, eps, activation, alpha, lo, hi, residual = inputs
    _save(ctx, x, mean, var, weight, bias, None, residual, output,
          Epilogue(activation, alpha, lo, hi))
    ctx.axes, ctx.eps = axes, eps


def _op_backward(ctx, dy, training: bool, need_dresidual: bool):
    """The backward through ``torch.ops.cbn.batch_norm_act_backward`` (traced)."""
    x, mean, var, weight, bias, mask, residual, y = ctx.saved_tensors
    return torch.ops.cbn.batch_norm_act_backward(
        dy, x, mean, var, weight, bias, ctx.axes, ctx.eps, mask, training, *ctx.epilogue,
        residual, y, need_dresidual)


def _eager_backward(ctx, dy, training: bool, need_dresidual: bool):
    """The backward on the core, with the float64 arrays the eager forward kept."""
    x, _, _, _, _, mask, residual, y = ctx.saved_tensors
    return act_backward_core(dy, x, ctx.channels, ctx.geometry, ctx.eps, mask, training,
                             ctx.epilogue, residual, y, need_dresidual)


def _grads(ctx, dy, backward, training: bool, needs: tuple[bool, bool, bool, bool]):
    """(dx, dweight, dbias, dresidual), each None unless ``needs`` says so."""
    dx, dweight, dbias, dres = backward(ctx, dy, training, needs[3])
    return (dx if needs[0] else None, _param_grad(dweight, ctx.metas[0], needs[1]),
            _param_grad(dbias, ctx.metas[1], needs[2]), dres if needs[3] else None)


def _train_grads(ctx, dy, backward):
    n = ctx.needs_input_grad
    dx, dweight, dbias, dres = _grads(ctx, dy, backward, True, (n[0], n[1], n[2], n[10]))
    return dx, dweight, dbias, None, None, None, None, None, None, None, dres


def _infer_grads(ctx, dy, backward):
    n = ctx.needs_input_grad
    dx, dweight, dbias, dres = _grads(ctx, dy, backward, False, (n[0], n[3], n[4], n[11]))
    return dx, None, None, dweight, dbias, None, None, None, None, None, None, dres


batch_norm_act_train.register_autograd(
    lambda ctx, dy, _dmean, _dvar: _train_grads(ctx, dy, _op_backward),
    setup_context=_setup_train)
batch_norm_act_infer.register_autograd(
    lambda ctx, dy: _infer_grads(ctx, dy, _op_backward), setup_context=_setup_infer)


class _EagerActTrain(torch.autograd.Function):
    """``cbn::batch_norm_act_train`` in eager mode (the geometry in place of the axes; see
    :mod:`cbn.torch._ops`' eager path)."""

    @staticmethod
    def forward(ctx, x, weight, bias, geometry, eps, mask, activation, alpha, lo, hi,
                residual):
        epilogue = Epilogue(activation, alpha, lo, hi)
        y, channels = train_core(x, weight, bias, geometry, eps, mask,
                                 _core_epilogue(x, epilogue, residual))
        _save(ctx, x, None, None, weight, bias, mask, residual, y, epilogue)
        ctx.channels, ctx.geometry, ctx.eps = channels, geometry, eps
        return y, channels  # the arrays pass through as a non-tensor output

    @staticmethod
    def backward(ctx, dy, _channels):
        return _train_grads(ctx, dy, _eager_backward)


class _EagerActInfer(torch.autograd.Function):
    """``cbn::batch_norm_act_infer`` in eager mode (the geometry in place of the axes)."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, geometry, eps, activation, alpha, lo, hi,
                residual):
        epilogue = Epilogue(activation, alpha, lo, hi)
        y, channels = infer_core(x, mean, var, weight, bias, geometry, eps,
                                 _core_epilogue(x, epilogue, residual))
        _save(ctx, x, None, None, weight, bias, None, residual, y, epilogue)
        ctx.channels, ctx.geometry, ctx.eps = channels, geometry, eps
        return y

    @staticmethod
    def backward(ctx, dy):
        return _infer_grads(ctx, dy, _eager_backward)


def train_act(x: Tensor, weight: Tensor | None, bias: Tensor | None, axes: list[int],
              eps: float, mask: Tensor | None, epilogue: Epilogue,
              residual: Tensor | None = None) -> tuple[Tensor, Statistics, Statistics]:
    """``torch.ops.cbn.batch_norm_act_train``, called directly in eager mode, where the
    batch statistics are the core's float64 arrays."""
    if _traced():
        return torch.ops.cbn.batch_norm_act_train(x, weight, bias, axes, eps, mask, *epilogue,
                                                  residual)
    geometry = _geometry(x, axes)
    if _needs_graph(x, weight, bias, residual):
        y, channels = _apply(_EagerActTrain, x, weight, bias, geometry, eps, mask, *epilogue,
                             residual)
    else:
        y, channels = train_core(x, weight, bias, geometry, eps, mask,
                                 _core_epilogue(x, epilogue, residual))
    return y, channels.mean, channels.var


def infer_act(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None,
              bias: Tensor | None, axes: list[int], eps: float, epilogue: Epilogue,
              residual: Tensor | None = None) -> Tensor:
    """``torch.ops.cbn.batch_norm_act_infer``, called directly in eager mode."""
    if _traced():
        return torch.ops.cbn.batch_norm_act_infer(x, mean, var, weight, bias, axes, eps,
                                                  *epilogue, residual)
    geometry = _geometry(x, axes)
    if _needs_graph(x, weight, bias, residual):
        return _apply(_EagerActInfer, x, mean, var, weight, bias, geometry, eps, *epilogue,
                      residual)
    return infer_core(x, mean, var, weight, bias, geometry, eps,
                      _core_epilogue(x, epilogue, residual))[0]
