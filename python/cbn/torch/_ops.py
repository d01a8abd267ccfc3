"""cbn's kernels as ``torch.library`` custom operators in the ``cbn`` namespace.

Registered when ``cbn.torch`` is imported; each has a fake (meta) implementation, so it
runs in eager mode, under ``torch.compile(fullgraph=True)`` and through ``torch.export``.
``axes`` are the channel (normalized) axes, any list, negatives allowed; statistics are
reduced over every other axis. Per-channel tensors (``weight``, ``bias``, ``mean``,
``var``) have the channel shape (sizes of ``axes`` in increasing axis order) or any shape
of as many elements. CPU tensors of float16, bfloat16, float32 or float64.

- ``torch.ops.cbn.batch_norm_train(Tensor x, Tensor? weight, Tensor? bias, int[] axes,
  float eps, Tensor? mask) -> (Tensor y, Tensor mean, Tensor var)``: batch mean and
  biased variance over the positions where ``mask`` (torch-broadcastable to ``x``) is
  nonzero (all when None); ``y = (x - mean) / sqrt(var + eps) * weight + bias`` in
  ``x``'s dtype and memory format; ``mean``/``var`` in the channel shape, float64 for
  float64 ``x``, else float32. Differentiable w.r.t. ``x``, ``weight`` and ``bias``
  through cbn's exact backward; ``mean`` and ``var`` carry no gradient (a gradient
  flowing into them is ignored).
- ``torch.ops.cbn.batch_norm_infer(Tensor x, Tensor mean, Tensor var, Tensor? weight,
  Tensor? bias, int[] axes, float eps) -> Tensor y``: the same formula with given
  statistics, differentiable w.r.t. ``x``, ``weight``, ``bias`` (``mean``/``var`` are
  constants).
- ``torch.ops.cbn.batch_norm_backward(Tensor dy, Tensor x, Tensor mean, Tensor var,
  Tensor? weight, int[] axes, float eps, Tensor? mask, bool training)
  -> (Tensor dx, Tensor dweight, Tensor dbias)``: ``dx`` (through the batch statistics
  when ``training``), ``dweight = Σ dy·x̂`` and ``dbias = Σ dy`` in the statistics
  dtype and channel shape. Not differentiable itself (double backward raises).
"""

from __future__ import annotations

import functools
import math
from typing import overload

import numpy as np
import torch

from .. import _core
from .._validate import normalize_axes, torch_numpy_view

__all__ = ["batch_norm_train", "batch_norm_infer", "batch_norm_backward", "train", "infer"]

_DATA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
Tensor = torch.Tensor


def as_numpy(t: Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor's memory (no copy), outside autograd."""
    t = t.detach()
    return torch_numpy_view(t) if t.dtype is torch.bfloat16 else t.numpy()


def _check_data(t: Tensor, name: str) -> None:
    if t.dtype not in _DATA_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64"
        )
    if t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}; cbn computes on CPU tensors only")


@functools.lru_cache(maxsize=64)
def _channel_axes(axes: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """normalize_axes, remembered: a module asks the same question on every call."""
    return normalize_axes(list(axes), rank, "axes")


def _geometry(x: Tensor, axes: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(sorted non-negative channel axes, channel shape) of ``x``."""
    _check_data(x, "x")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension; received a scalar")
    ax = _channel_axes(tuple(axes), x.dim())
    return ax, tuple(x.shape[a] for a in ax)


@overload
def _param(t: Tensor, channels: int, name: str) -> np.ndarray: ...
@overload
def _param(t: None, channels: int, name: str) -> None: ...
@overload
def _param(t: Tensor | None, channels: int, name: str) -> np.ndarray | None: ...
def _param(t: Tensor | None, channels: int, name: str) -> np.ndarray | None:
    """A per-channel tensor as the contiguous float64 array the core reads."""
    if t is None:
        return None
    if t.numel() != channels:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}; expected {channels} values "
            "(the sizes of the channel axes)"
        )
    return as_numpy(t).reshape(-1).astype(np.float64)


def _mask(mask: Tensor | None, x: Tensor) -> np.ndarray | None:
    """A bool NumPy view of ``mask`` of ``x``'s rank (torch broadcasting: leading 1s)."""
    if mask is None:
        return None
    if mask.dim() > x.dim() or any(
        m not in (1, s) for m, s in zip(mask.shape[::-1], x.shape[::-1], strict=False)
    ):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}, which does not broadcast to the input "
            f"shape {tuple(x.shape)}"
        )
    m = mask.detach()
    if m.dtype != torch.bool:
        m = m != 0
    return as_numpy(m.reshape((1,) * (x.dim() - m.dim()) + tuple(m.shape)))


def like_input(t: Tensor, x: Tensor, name: str) -> Tensor:
    """``t`` checked to have ``x``'s shape, in ``x``'s dtype."""
    if t.shape != x.shape:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}; expected x's shape {tuple(x.shape)}")
    return t.to(x.dtype)


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _stats(values: np.ndarray, x: Tensor, cshape: tuple[int, ...]) -> Tensor:
    """Float64 per-channel values from the core as a tensor of the statistics dtype."""
    if x.dtype != torch.float64:
        values = values.astype(np.float32)
    return torch.from_numpy(values.reshape(cshape))


def train_core(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, axes: list[int], eps: float,
    mask: Tensor | None, epilogue: tuple | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The training forward on the core; ``epilogue`` is the core's epilogue tuple."""
    ax, cshape = _geometry(x, axes)
    c = math.prod(cshape)
    y = torch.empty_like(x)
    mean, var = _core.train_forward(as_numpy(x), as_numpy(y), ax, _mask(mask, x),
                                    _param(weight, c, "weight"), _param(bias, c, "bias"),
                                    float(eps), epilogue)
    return y, _stats(mean, x, cshape), _stats(var, x, cshape)


def infer_core(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
    axes: list[int], eps: float, epilogue: tuple | None = None,
) -> Tensor:
    """Inference on the core; ``epilogue`` is the core's epilogue tuple."""
    ax, cshape = _geometry(x, axes)
    c = math.prod(cshape)
    y = torch.empty_like(x)
    _core.normalize(as_numpy(x), as_numpy(y), ax, _param(mean, c, "mean"),
                    _param(var, c, "var"), _param(weight, c, "weight"), _param(bias, c, "bias"),
                    float(eps), epilogue)
    return y


def _train_impl(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, axes: list[int], eps: float,
    mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    return train_core(x, weight, bias, axes, eps, mask)


def _infer_impl(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
    axes: list[int], eps: float,
) -> Tensor:
    return infer_core(x, mean, var, weight, bias, axes, eps)


def _backward_impl(
    dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, axes: list[int],
    eps: float, mask: Tensor | None, training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    ax, cshape = _geometry(x, axes)
    c = math.prod(cshape)
    dy = like_input(dy, x, "dy")
    dx = torch.empty_like(x)
    sum_dy, sum_dy_xhat = _core.backward(
        as_numpy(dy), as_numpy(x), as_numpy(dx), ax, _mask(mask, x), _param(mean, c, "mean"),
        _param(var, c, "var"), _param(weight, c, "weight"), float(eps), bool(training))
    return dx, _stats(sum_dy_xhat, x, cshape), _stats(sum_dy, x, cshape)


batch_norm_train = torch.library.custom_op("cbn::batch_norm_train", _train_impl,
                                           mutates_args=())
batch_norm_infer = torch.library.custom_op("cbn::batch_norm_infer", _infer_impl,
                                           mutates_args=())
batch_norm_backward = torch.library.custom_op("cbn::batch_norm_backward", _backward_impl,
                                              mutates_args=())


def _fake_stats(x: Tensor, axes: list[int]) -> Tensor:
    _, cshape = _geometry(x, axes)
    return x.new_empty(cshape, dtype=_stats_dtype(x))


@batch_norm_train.register_fake
def _(x, weight, bias, axes, eps, mask):
    return torch.empty_like(x), _fake_stats(x, axes), _fake_stats(x, axes)


@batch_norm_infer.register_fake
def _(x, mean, var, weight, bias, axes, eps):
    _geometry(x, axes)
    return torch.empty_like(x)


@batch_norm_backward.register_fake
def _(dy, x, mean, var, weight, axes, eps, mask, training):
    return torch.empty_like(x), _fake_stats(x, axes), _fake_stats(x, axes)


def _meta(param: Tensor | None) -> tuple[torch.dtype, torch.Size] | None:
    return None if param is None else (param.dtype, param.shape)


def _param_grad(grad: Tensor, meta, needed: bool) -> Tensor | None:
    """A per-channel gradient in its parameter's dtype and shape (None if not needed)."""
    if meta is None or not needed:
        return None
    return grad.to(meta[0]).reshape(meta[1])


def _setup_train(ctx, inputs, output):
    x, weight, bias, axes, eps, mask = inputs
    _, mean, var = output
    ctx.save_for_backward(x, weight, mean, var, mask)
    ctx.axes, ctx.eps, ctx.metas = axes, eps, (_meta(weight), _meta(bias))


def _train_grads(ctx, dy, backward):
    x, weight, mean, var, mask = ctx.saved_tensors
    dx, dweight, dbias = backward(dy, x, mean, var, weight, ctx.axes, ctx.eps, mask, True)
    needs = ctx.needs_input_grad
    return (dx if needs[0] else None, _param_grad(dweight, ctx.metas[0], needs[1]),
            _param_grad(dbias, ctx.metas[1], needs[2]), None, None, None)


def _setup_infer(ctx, inputs, output):
    x, mean, var, weight, bias, axes, eps = inputs
    ctx.save_for_backward(x, mean, var, weight)
    ctx.axes, ctx.eps, ctx.metas = axes, eps, (_meta(weight), _meta(bias))


def _infer_grads(ctx, dy, backward):
    x, mean, var, weight = ctx.saved_tensors
    dx, dweight, dbias = backward(dy, x, mean, var, weight, ctx.axes, ctx.eps, None, False)
    needs = ctx.needs_input_grad
    return (dx if needs[0] else None, None, None, _param_grad(dweight, ctx.metas[0], needs[3]),
            _param_grad(dbias, ctx.metas[1], needs[4]), None, None)


batch_norm_train.register_autograd(
    lambda ctx, dy, _dmean, _dvar: _train_grads(ctx, dy, torch.ops.cbn.batch_norm_backward),
    setup_context=_setup_train)
batch_norm_infer.register_autograd(
    lambda ctx, dy: _infer_grads(ctx, dy, torch.ops.cbn.batch_norm_backward),
    setup_context=_setup_infer)


def eager_function(name: str, impl, setup, grads, backward_impl
                   ) -> type[torch.autograd.Function]:
    """The eager path of a custom operator: ``impl`` as a ``torch.autograd.Function``
    without the dispatcher's per-call cost (tens of microseconds, more than the kernels
    take on small tensors). ``forward`` takes ctx itself: with a separate setup_context,
    ``Function.apply`` binds the arguments through inspect.signature on every call
    (another ~30 µs). ``grads(ctx, dy, backward_impl)`` gives the input gradients from
    the output's (the statistics an operator also returns carry none)."""

    def forward(ctx, *inputs):
        output = impl(*inputs)
        setup(ctx, inputs, output)
        return output

    def backward(ctx, dy, *_statistics):
        return grads(ctx, dy, backward_impl)

    return type(name, (torch.autograd.Function,), {
        "forward": staticmethod(forward), "backward": staticmethod(backward)})


_EagerTrain = eager_function("_EagerTrain", _train_impl, _setup_train, _train_grads,
                             _backward_impl)
_EagerInfer = eager_function("_EagerInfer", _infer_impl, _setup_infer, _infer_grads,
                             _backward_impl)


def _traced() -> bool:
    """Under torch.compile/export or a torch.func transform: the custom operators,
    which those understand, instead of the eager shortcut."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def _needs_graph(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def train(x: Tensor, weight: Tensor | None, bias: Tensor | None, axes: list[int], eps: float,
          mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.ops.cbn.batch_norm_train``, called directly in eager mode."""
    if _traced():
        return torch.ops.cbn.batch_norm_train(x, weight, bias, axes, eps, mask)
    if _needs_graph(x, weight, bias):
        return _EagerTrain.apply(x, weight, bias, axes, eps, mask)
    return _train_impl(x, weight, bias, axes, eps, mask)


def infer(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
          axes: list[int], eps: float) -> Tensor:
    """``torch.ops.cbn.batch_norm_infer``, called directly in eager mode."""
    if _traced():
        return torch.ops.cbn.batch_norm_infer(x, mean, var, weight, bias, axes, eps)
    if _needs_graph(x, weight, bias):
        return _EagerInfer.apply(x, mean, var, weight, bias, axes, eps)
    return _infer_impl(x, mean, var, weight, bias, axes, eps)
