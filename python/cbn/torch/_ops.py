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
from collections.abc import Sequence
from typing import NamedTuple, overload

import numpy as np
import torch

from .. import _core
from .._validate import normalize_axes, torch_numpy_view

__all__ = ["batch_norm_train", "batch_norm_infer", "batch_norm_backward", "train", "infer"]

_DATA_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: NumPy's dtypes of the data dtypes it has (bfloat16 converts through torch).
_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}
Tensor = torch.Tensor
#: Batch statistics: the eager path's float64 arrays, or a traced operator's tensors.
Statistics = np.ndarray | Tensor


def as_numpy(t: Tensor, *, output: bool = False) -> np.ndarray:
    """A NumPy view of a CPU tensor's memory (no copy), outside autograd.

    A read takes ``numpy(force=True)``, which detaches in C++ (a Python ``detach()`` costs
    as much as the view) and copies a tensor off the CPU or with a lazy neg/conj bit; an
    ``output`` (a tensor that does not require grad, as cbn's new outputs and a module's
    buffers) is a view or an error, never a copy the writes would be lost in."""
    if t.dtype is torch.bfloat16:
        return torch_numpy_view(t.detach())
    return t.numpy() if output else t.numpy(force=True)


def _check_data(t: Tensor, name: str) -> None:
    if t.dtype not in _DATA_DTYPES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64"
        )
    if not t.is_cpu:
        raise ValueError(f"{name} is on {t.device}; cbn computes on CPU tensors only")


@functools.lru_cache(maxsize=64)
def _channel_axes(axes: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """normalize_axes, remembered: a module asks the same question on every call."""
    return normalize_axes(list(axes), rank, "axes")


class Geometry(NamedTuple):
    """Where an input's channels are."""

    axes: tuple[int, ...]  #: the channel axes, sorted and non-negative
    shape: tuple[int, ...]  #: their sizes, the channel shape
    channels: int  #: the number of channels (the product of ``shape``)


def _geometry(x: Tensor, axes: list[int]) -> Geometry:
    """``x``'s channel geometry, after checking ``x``."""
    _check_data(x, "x")
    shape = x.shape
    if not shape:
        raise ValueError("x must have at least one dimension; received a scalar")
    ax = _channel_axes(tuple(axes), len(shape))
    cshape = tuple([shape[a] for a in ax])
    return Geometry(ax, cshape, math.prod(cshape))


@overload
def _param(t: Tensor, channels: int, name: str) -> np.ndarray: ...
@overload
def _param(t: None, channels: int, name: str) -> None: ...
@overload
def _param(t: Tensor | None, channels: int, name: str) -> np.ndarray | None: ...
def _param(t: Tensor | None, channels: int, name: str) -> np.ndarray | None:
    """A per-channel tensor as the contiguous float64 array the core reads (a copy)."""
    if t is None:
        return None
    if t.numel() != channels:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)}; expected {channels} values "
            "(the sizes of the channel axes)"
        )
    return as_numpy(t).reshape(-1).astype(np.float64)


class Channels(NamedTuple):
    """A forward's per-channel float64 arrays as the core read or computed them: the
    statistics (in training, the batch mean and biased variance) and the weight and bias
    (None when absent). An eager forward keeps them for its backward."""

    mean: np.ndarray
    var: np.ndarray
    weight: np.ndarray | None
    bias: np.ndarray | None


def as_channels(geometry: Geometry, mean: Tensor, var: Tensor, weight: Tensor | None,
                bias: Tensor | None) -> Channels:
    """Per-channel tensors as the core's arrays (each checked to have as many values as
    there are channels)."""
    c = geometry.channels
    return Channels(_param(mean, c, "mean"), _param(var, c, "var"), _param(weight, c, "weight"),
                    _param(bias, c, "bias"))


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
    return t if t.dtype == x.dtype else t.to(x.dtype)


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tensor(values: np.ndarray, dtype: torch.dtype, shape: Sequence[int]) -> Tensor:
    """The core's float64 per-channel values as a new tensor of ``dtype`` and ``shape``."""
    np_dtype = _NUMPY_DTYPES.get(dtype)
    t = (torch.from_numpy(values).to(dtype) if np_dtype is None  # bfloat16
         else torch.from_numpy(values.astype(np_dtype)))
    return t if len(shape) == 1 else t.reshape(shape)


def _stats(values: np.ndarray, x: Tensor, cshape: tuple[int, ...]) -> Tensor:
    """Float64 per-channel values from the core as a tensor of the statistics dtype."""
    return _tensor(values, _stats_dtype(x), cshape)


def _view(t: Tensor | None) -> np.ndarray | None:
    return None if t is None else as_numpy(t)


def _kept(params: np.ndarray, training: bool, weight: Tensor | None,
          bias: Tensor | None) -> Channels:
    """The arrays of a fast call from its kept (4, C) float64 parameters: (gamma, beta,
    mean, var) after training, (mean, var, gamma, beta) after inference."""
    first, second, third, fourth = params
    mean, var, gamma, beta = ((third, fourth, first, second) if training
                              else (first, second, third, fourth))
    return Channels(mean, var, None if weight is None else gamma, None if bias is None else beta)


def train_core(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, geometry: Geometry, eps: float,
    mask: Tensor | None, epilogue: tuple | None = None,
) -> tuple[Tensor, Channels]:
    """The training forward on the core (``epilogue``: the core's epilogue tuple): ``y``
    and the arrays, with the batch statistics. The common call (float32/float64 ``x``, one
    channel axis, 1-D float32/float64 parameters, no mask or epilogue) takes the core's
    fast path, which reads the parameters as they are (no float64 copies made here)."""
    m = _mask(mask, x)
    y = torch.empty_like(x)
    xa, ya = as_numpy(x), as_numpy(y, output=True)
    if m is None and epilogue is None and len(geometry.axes) == 1:
        kept = _core.train_fast(xa, _view(weight), _view(bias), geometry.axes[0], float(eps),
                                out=ya, keep_params=True)
        if kept is not None:
            return y, _kept(kept[1], True, weight, bias)
    c = geometry.channels
    w, b = _param(weight, c, "weight"), _param(bias, c, "bias")
    mean, var = _core.train_forward(xa, ya, geometry.axes, m, w, b, float(eps), epilogue)
    return y, Channels(mean, var, w, b)


def infer_core(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
    geometry: Geometry, eps: float, epilogue: tuple | None = None,
) -> tuple[Tensor, Channels]:
    """Inference on the core (``epilogue``: the core's epilogue tuple): ``y`` and the
    arrays; the common call takes the fast path, as :func:`train_core`'s."""
    y = torch.empty_like(x)
    xa, ya = as_numpy(x), as_numpy(y, output=True)
    if epilogue is None and len(geometry.axes) == 1:
        kept = _core.normalize_fast(xa, as_numpy(mean), as_numpy(var), _view(weight),
                                    _view(bias), geometry.axes[0], float(eps), out=ya,
                                    keep_params=True)
        if kept is not None:
            return y, _kept(kept[1], False, weight, bias)
    channels = as_channels(geometry, mean, var, weight, bias)
    _core.normalize(xa, ya, geometry.axes, *channels, float(eps), epilogue)
    return y, channels


def backward_core(
    dy: Tensor, x: Tensor, channels: Channels, geometry: Geometry, eps: float,
    mask: Tensor | None, training: bool,
) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """``dx`` and the float64 ``(Σ dy·x̂, Σ dy)``, the weight and bias gradients, of the
    forward that had ``channels``; ``dy`` has ``x``'s shape and dtype (as autograd gives
    the output's gradient)."""
    dx = torch.empty_like(x)
    sum_dy, sum_dy_xhat = _core.backward(
        as_numpy(dy), as_numpy(x), as_numpy(dx, output=True), geometry.axes, _mask(mask, x),
        channels.mean, channels.var, channels.weight, float(eps), bool(training))
    return dx, sum_dy_xhat, sum_dy


def _with_stats(
    x: Tensor, geometry: Geometry, forward: tuple[Tensor, Channels]
) -> tuple[Tensor, Tensor, Tensor]:
    """A training forward's ``(y, mean, var)`` as the operator returns them."""
    y, channels = forward
    return (y, _stats(channels.mean, x, geometry.shape), _stats(channels.var, x, geometry.shape))


def _train_impl(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, axes: list[int], eps: float,
    mask: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    geometry = _geometry(x, axes)
    return _with_stats(x, geometry, train_core(x, weight, bias, geometry, eps, mask))


def _infer_impl(
    x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
    axes: list[int], eps: float,
) -> Tensor:
    return infer_core(x, mean, var, weight, bias, _geometry(x, axes), eps)[0]


def _backward_impl(
    dy: Tensor, x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, axes: list[int],
    eps: float, mask: Tensor | None, training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    geometry = _geometry(x, axes)
    dy = like_input(dy, x, "dy")
    channels = as_channels(geometry, mean, var, weight, None)
    dx, dweight, dbias = backward_core(dy, x, channels, geometry, eps, mask, training)
    return dx, _stats(dweight, x, geometry.shape), _stats(dbias, x, geometry.shape)


batch_norm_train = torch.library.custom_op("cbn::batch_norm_train", _train_impl,
                                           mutates_args=())
batch_norm_infer = torch.library.custom_op("cbn::batch_norm_infer", _infer_impl,
                                           mutates_args=())
batch_norm_backward = torch.library.custom_op("cbn::batch_norm_backward", _backward_impl,
                                              mutates_args=())


def _fake_stats(x: Tensor, axes: list[int]) -> Tensor:
    return x.new_empty(_geometry(x, axes).shape, dtype=_stats_dtype(x))


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


def _param_grad(grad: Tensor | np.ndarray, meta, needed: bool) -> Tensor | None:
    """A per-channel gradient (the backward operator's tensor, or the core's float64
    array) in its parameter's dtype and shape; None if not needed."""
    if meta is None or not needed:
        return None
    if isinstance(grad, np.ndarray):
        return _tensor(grad, *meta)
    return grad.to(meta[0]).reshape(meta[1])


def _train_input_grads(ctx, dx, dweight, dbias) -> tuple[Tensor | None, ...]:
    """The gradients of ``(x, weight, bias, axes, eps, mask)``, None where not needed."""
    needs = ctx.needs_input_grad
    return (dx if needs[0] else None, _param_grad(dweight, ctx.metas[0], needs[1]),
            _param_grad(dbias, ctx.metas[1], needs[2]), None, None, None)


def _infer_input_grads(ctx, dx, dweight, dbias) -> tuple[Tensor | None, ...]:
    """The gradients of ``(x, mean, var, weight, bias, axes, eps)``."""
    needs = ctx.needs_input_grad
    return (dx if needs[0] else None, None, None, _param_grad(dweight, ctx.metas[0], needs[3]),
            _param_grad(dbias, ctx.metas[1], needs[4]), None, None)


def _setup_train(ctx, inputs, output):
    x, weight, bias, axes, eps, mask = inputs
    _, mean, var = output
    ctx.save_for_backward(x, weight, mean, var, mask)
    ctx.axes, ctx.eps, ctx.metas = axes, eps, (_meta(weight), _meta(bias))


def _train_backward(ctx, dy, _dmean, _dvar):
    x, weight, mean, var, mask = ctx.saved_tensors
    return _train_input_grads(ctx, *torch.ops.cbn.batch_norm_backward(
        dy, x, mean, var, weight, ctx.axes, ctx.eps, mask, True))


def _setup_infer(ctx, inputs, output):
    x, mean, var, weight, bias, axes, eps = inputs
    ctx.save_for_backward(x, mean, var, weight)
    ctx.axes, ctx.eps, ctx.metas = axes, eps, (_meta(weight), _meta(bias))


def _infer_backward(ctx, dy):
    x, mean, var, weight = ctx.saved_tensors
    return _infer_input_grads(ctx, *torch.ops.cbn.batch_norm_backward(
        dy, x, mean, var, weight, ctx.axes, ctx.eps, None, False))


batch_norm_train.register_autograd(_train_backward, setup_context=_setup_train)
batch_norm_infer.register_autograd(_infer_backward, setup_context=_setup_infer)


# The eager path: torch.autograd.Functions on the same core calls, without the
# dispatcher's per-call cost (tens of microseconds, more than the kernels take on small
# tensors). Their forward takes ctx itself (with a separate setup_context, apply binds
# the arguments through inspect.signature on every call, another ~30 µs) and keeps the
# core's float64 arrays (Channels) for the backward, which saves converting the
# statistics and parameters again. The input and the weight are saved as usual, so
# modifying them in place before the backward raises, as in torch; the statistics are the
# forward's values (as in torch, a training step that updates the running statistics
# before an inference output's backward does not make that backward raise).

_unwrap_if_dead = torch._C._functorch.unwrap_if_dead


def _apply(function: type[torch.autograd.Function], *args):
    """``function.apply(*args)`` without ``torch.autograd.Function.apply``'s Python
    preamble (a few µs a call), for the eager path, where no functorch transform is active
    (``_traced()`` said so): the preamble's one remaining step, unwrapping dead functorch
    wrappers, is done here."""
    apply = super(torch.autograd.Function, function).apply  # type: ignore[misc]
    return apply(*[_unwrap_if_dead(a) if isinstance(a, Tensor) else a for a in args])


def _keep(ctx, channels: Channels, geometry: Geometry, eps: float, weight, bias) -> None:
    """What an eager backward reads besides its saved tensors."""
    ctx.channels, ctx.geometry, ctx.eps = channels, geometry, eps
    ctx.metas = (_meta(weight), _meta(bias))


class _EagerTrain(torch.autograd.Function):
    """``cbn::batch_norm_train`` in eager mode (the geometry in place of the axes)."""

    @staticmethod
    def forward(ctx, x, weight, bias, geometry, eps, mask):
        y, channels = train_core(x, weight, bias, geometry, eps, mask)
        ctx.save_for_backward(x, weight, mask)  # weight: the in-place modification check
        _keep(ctx, channels, geometry, eps, weight, bias)
        return y, channels  # the arrays pass through as a non-tensor output

    @staticmethod
    def backward(ctx, dy, _channels):
        x, _, mask = ctx.saved_tensors
        return _train_input_grads(ctx, *backward_core(dy, x, ctx.channels, ctx.geometry,
                                                      ctx.eps, mask, True))


class _EagerInfer(torch.autograd.Function):
    """``cbn::batch_norm_infer`` in eager mode (the geometry in place of the axes)."""

    @staticmethod
    def forward(ctx, x, mean, var, weight, bias, geometry, eps):
        y, channels = infer_core(x, mean, var, weight, bias, geometry, eps)
        ctx.save_for_backward(x, weight)  # the statistics: constants, kept as arrays
        _keep(ctx, channels, geometry, eps, weight, bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        x = ctx.saved_tensors[0]
        return _infer_input_grads(ctx, *backward_core(dy, x, ctx.channels, ctx.geometry,
                                                      ctx.eps, None, False))


def _traced() -> bool:
    """Under torch.compile/export or a torch.func transform: the custom operators,
    which those understand, instead of the eager shortcut."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def _needs_graph(*tensors: Tensor | None) -> bool:
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and t.requires_grad:
                return True
    return False


def train(x: Tensor, weight: Tensor | None, bias: Tensor | None, axes: list[int], eps: float,
          mask: Tensor | None = None) -> tuple[Tensor, Statistics, Statistics]:
    """``torch.ops.cbn.batch_norm_train``, called directly in eager mode, where the batch
    statistics are the core's float64 arrays (of the channels, in order)."""
    if _traced():
        return torch.ops.cbn.batch_norm_train(x, weight, bias, axes, eps, mask)
    geometry = _geometry(x, axes)
    args = (x, weight, bias, geometry, eps, mask)
    y, channels = (_apply(_EagerTrain, *args) if _needs_graph(x, weight, bias)
                   else train_core(*args))
    return y, channels.mean, channels.var


def infer(x: Tensor, mean: Tensor, var: Tensor, weight: Tensor | None, bias: Tensor | None,
          axes: list[int], eps: float) -> Tensor:
    """``torch.ops.cbn.batch_norm_infer``, called directly in eager mode."""
    if _traced():
        return torch.ops.cbn.batch_norm_infer(x, mean, var, weight, bias, axes, eps)
    args = (x, mean, var, weight, bias, _geometry(x, axes), eps)
    if _needs_graph(x, weight, bias):
        return _apply(_EagerInfer, *args)
    return infer_core(*args)[0]
