"""Functional batch normalization on NumPy arrays (and anything that converts to one
without a copy: buffer protocol, ``__array__``, DLPack).

``axis`` always names the *channel* (normalized) axes, as in the layer; statistics
are reduced over all other axes. Statistics come back in the shape of the channel
axes (increasing axis order), as float64 for float64 input and float32 otherwise.

Fused epilogue: :func:`batch_normalization`, :func:`batch_norm_train` and
:func:`batch_norm_backward` take ``activation``, ``activation_alpha``, ``clip`` and
``residual``, and then compute ``y = act(bn(x) + residual)`` in the same sweep over the
data (``z = bn(x) + residual`` never goes to memory). ``activation`` is one of None
(also ``"identity"``, ``"linear"``), ``"relu"``, ``"relu6"``, ``"leaky_relu"`` (slope
``activation_alpha`` below 0, finite), ``"clip"`` (to ``clip=(lo, hi)``, given only with
it), ``"silu"`` (``z·sigmoid(z)``) and ``"gelu"`` (alias ``"gelu_tanh"``: the tanh
approximation). ``residual`` (optional) has the input's shape and is read in its dtype
(converted otherwise); it may be the ``out`` array itself. The activation is computed in
float32 for 16- and 32-bit data, in float64 for float64. Derivatives at the kinks are
PyTorch's: ``relu'(0) = 0``, relu6 and clip have slope 1 strictly inside their bounds,
leaky_relu slope 1 only for ``z > 0``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from . import _core
from ._epilogue import Epilogue, epilogue, input_like
from ._validate import (
    as_array,
    as_param,
    canonical_mask,
    channel_shape,
    check_epsilon,
    check_out,
    kernel_dtype,
    normalize_axes,
)
from .distributed import Allreduce, check_allreduce, sum_across_ranks

__all__ = [
    "moments", "batch_normalization", "batch_norm_train", "batch_norm_backward", "fold",
]


def _input(x: ArrayLike) -> np.ndarray:
    arr = as_array(x, "x")
    if arr.ndim == 0:
        raise ValueError("x must have at least one dimension; received a scalar")
    dtype = kernel_dtype(arr)
    return arr if arr.dtype == dtype else arr.astype(dtype)


def _prepare(
    x: ArrayLike, axis: int | list[int], epsilon: float
) -> tuple[np.ndarray, tuple[int, ...], tuple[int, ...], float]:
    """The checks every op starts with: ``x`` as the array the core reads, its channel
    axes, the channel shape, and ``epsilon`` as a float."""
    arr = _input(x)
    axes = normalize_axes(axis, arr.ndim)
    return arr, axes, channel_shape(arr.shape, axes), check_epsilon(epsilon)


def _channel_result(x: np.ndarray, cshape: tuple[int, ...], values: np.ndarray) -> np.ndarray:
    """Per-channel float64 results in the channel shape, as float64 for float64 ``x`` and
    float32 otherwise (a float32 variance beyond 3.4e38 rounds to inf, as NumPy's)."""
    dtype = np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)
    with np.errstate(over="ignore"):
        return values.astype(dtype).reshape(cshape)


def _channel_stats(
    x: np.ndarray, cshape: tuple[int, ...], first: np.ndarray, second: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    return _channel_result(x, cshape, first), _channel_result(x, cshape, second)


def _output(x: np.ndarray, out: ArrayLike | None, dy: np.ndarray | None = None) -> np.ndarray:
    """A new array like ``x``, or ``out`` checked: ``x``'s shape and dtype, and either ``x``
    itself (in place) or not overlapping it; likewise for ``dy`` when given."""
    if out is None:
        return np.empty_like(x)
    if dy is not None:
        out = check_out(out, dy, x.dtype)
    return check_out(out, x, x.dtype)


def _required_statistics(
    mean: np.ndarray | None, variance: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    if mean is None or variance is None:
        raise TypeError("mean and variance are required arrays; received None")
    return mean, variance


def _synchronized_backward(
    allreduce: Allreduce, grad: np.ndarray, x: np.ndarray, dx: np.ndarray,
    axes: tuple[int, ...], mask: np.ndarray | None, mean: np.ndarray, variance: np.ndarray,
    gamma: np.ndarray | None, epsilon: float,
) -> tuple[np.ndarray, np.ndarray]:
    """``dx`` through statistics of all ranks: this rank's backward sums are summed across
    ranks in one call of ``allreduce``, then applied. Returns this rank's own ``Σdy`` and
    ``Σdy·x̂``."""
    sums = _core.backward_sums(grad, x, axes, mask, mean, variance, epsilon)
    c = sums.shape[0] // 3
    # Kept before the collective, which may sum in place: dγ, dβ are this rank's.
    sum_dy, sum_dy_xhat = sums[c:2 * c].copy(), sums[2 * c:].copy()
    _core.backward_apply(grad, x, dx, axes, mask, mean, variance, gamma, epsilon,
                         sum_across_ranks(allreduce, sums))
    return sum_dy, sum_dy_xhat


def _backward(
    allreduce: Allreduce | None, grad: np.ndarray, x: np.ndarray, dx: np.ndarray,
    axes: tuple[int, ...], mask: np.ndarray | None, mean: np.ndarray, variance: np.ndarray,
    gamma: np.ndarray | None, beta: np.ndarray | None, epsilon: float, training: bool,
    epi: Epilogue | None, output: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Writes ``dx``; returns ``Σg``, ``Σg·x̂`` and ``dresidual`` (``g``, when the epilogue
    has a residual, else None), ``g = dy·act'(z)`` the gradient at the normalized value
    (``dy`` itself without an epilogue). Synchronized when ``allreduce`` and training."""
    dres = None if epi is None or epi[4] is None else np.empty_like(x)
    if allreduce is not None and training:
        if epi is not None:
            g = np.empty_like(x) if dres is None else dres
            _core.epilogue_gradient(grad, x, g, axes, mean, variance, gamma, beta, epsilon, epi,
                                    output)
            grad = g
        return (*_synchronized_backward(allreduce, grad, x, dx, axes, mask, mean, variance,
                                        gamma, epsilon), dres)
    if epi is None:
        return (*_core.backward(grad, x, dx, axes, mask, mean, variance, gamma, epsilon,
                                training), None)
    return (*_core.backward_epilogue(grad, x, dx, axes, mask, mean, variance, gamma, beta,
                                     epsilon, training, epi, output, dres), dres)


def moments(
    x: ArrayLike, axis: int | list[int] = -1, mask: ArrayLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance of ``x``.

    ``mask`` (optional) selects the positions that count: either the input's shape
    without its last axis, or any shape of the input's rank that broadcasts to it.
    A channel with no used position gets mean 0 and variance 0.

    >>> import numpy as np, cbn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 50.0]])
    >>> cbn.ops.moments(x, axis=-1)
    (array([ 3., 30.]), array([  2.66666667, 266.66666667]))
    >>> cbn.ops.moments(x, axis=-1, mask=np.array([True, True, False]))
    (array([ 2., 20.]), array([  1., 100.]))
    """
    arr = _input(x)
    axes = normalize_axes(axis, arr.ndim)
    m = canonical_mask(mask, arr.shape)
    mean, var, _ = _core.moments(arr, axes, m)
    return _channel_stats(arr, channel_shape(arr.shape, axes), mean, var)


def batch_normalization(
    x: ArrayLike,
    mean: ArrayLike,
    variance: ArrayLike,
    *,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    axis: int | list[int] = -1,
    epsilon: float = 1e-3,
    out: Any = None,
    activation: str | None = None,
    activation_alpha: float = 0.01,
    clip: tuple[float, float] | None = None,
    residual: ArrayLike | None = None,
) -> np.ndarray:
    """Inference: ``(x - mean) * gamma / sqrt(variance + epsilon) + beta`` per channel,
    then ``act(· + residual)`` with the fused epilogue's arguments (module docstring).

    ``mean``, ``variance``, ``gamma``, ``beta`` have the channel shape (or it with
    extra size-1 dims). ``out=x`` normalizes in place. Returns the output array
    (the input's dtype; integers and bool give float32).

    >>> import numpy as np, cbn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]], dtype=np.float32)
    >>> cbn.ops.batch_normalization(x, mean=[2.0, 20.0], variance=[1.0, 100.0], epsilon=0.0,
    ...                             beta=[0.5, 0.5])
    array([[-0.5, -0.5],
           [ 1.5,  1.5]], dtype=float32)
    >>> cbn.ops.batch_normalization(x, mean=[2.0, 20.0], variance=[1.0, 100.0], epsilon=0.0,
    ...                             activation="relu", residual=[[0.25, 2.0], [0.0, -3.0]])
    array([[0., 1.],
           [1., 0.]], dtype=float32)
    """
    fast: np.ndarray | None = _core.normalize_fast(x, mean, variance, gamma, beta, axis, epsilon,
                                                   out, activation, activation_alpha, clip,
                                                   residual)
    if fast is not None:
        return fast
    arr, axes, cshape, eps = _prepare(x, axis, epsilon)
    mu, var, g, b = (as_param(v, cshape, n) for v, n in (
        (mean, "mean"), (variance, "variance"), (gamma, "gamma"), (beta, "beta")))
    mu, var = _required_statistics(mu, var)
    epi = epilogue(arr, activation, activation_alpha, clip, residual)
    y = _output(arr, out)
    _core.normalize(arr, y, axes, mu, var, g, b, eps, epilogue=epi)
    return y


def batch_norm_train(
    x: ArrayLike,
    *,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    axis: int | list[int] = -1,
    epsilon: float = 1e-3,
    mask: ArrayLike | None = None,
    out: Any = None,
    allreduce: Allreduce | None = None,
    shift: ArrayLike | None = None,
    activation: str | None = None,
    activation_alpha: float = 0.01,
    clip: tuple[float, float] | None = None,
    residual: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training forward: batch statistics (masked as :func:`moments`), then every
    position normalized with them, in one pass over the data, and the fused epilogue
    ``act(· + residual)`` if asked for (module docstring).

    With ``allreduce`` (a :mod:`cbn.distributed` callback) the statistics are those
    of the union of all ranks' used positions: this rank's partial moments are summed
    across ranks in exactly one call of ``allreduce``, then every rank normalizes its
    own ``x`` with the global statistics (a second pass: no output can be written
    before the collective). ``shift`` (channel shape, default 0) is a
    per-channel value every rank shares, close to the mean (a layer passes its moving
    mean): the merge is exact to 1e-6 while ``|mean - shift| <= 1e3 * std``. Without
    ``allreduce`` the statistics are local and ``shift`` is not needed (it is
    validated and otherwise unused). If ``allreduce`` raises, ``out`` is untouched.

    Returns ``(y, mean, variance)``.

    >>> import numpy as np, cbn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]], dtype=np.float32)
    >>> y, mean, variance = cbn.ops.batch_norm_train(x, epsilon=0.0)
    >>> y
    array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> mean, variance
    (array([ 2., 20.], dtype=float32), array([  1., 100.], dtype=float32))
    """
    if mask is None and allreduce is None and shift is None:
        fast: tuple[np.ndarray, np.ndarray, np.ndarray] | None = _core.train_fast(
            x, gamma, beta, axis, epsilon, out, activation, activation_alpha, clip, residual)
        if fast is not None:
            return fast
    arr, axes, cshape, eps = _prepare(x, axis, epsilon)
    g = as_param(gamma, cshape, "gamma")
    b = as_param(beta, cshape, "beta")
    k = as_param(shift, cshape, "shift")
    m = canonical_mask(mask, arr.shape)
    check_allreduce(allreduce)
    epi = epilogue(arr, activation, activation_alpha, clip, residual)
    y = _output(arr, out)
    if allreduce is None:
        mean, var = _core.train_forward(arr, y, axes, m, g, b, eps, epilogue=epi)
    else:
        partial = _core.moments_partial(arr, axes, m, k)
        mean, var = _core.moments_finalize(sum_across_ranks(allreduce, partial), k)
        _core.normalize(arr, y, axes, mean, var, g, b, eps, epilogue=epi)
    return (y, *_channel_stats(arr, cshape, mean, var))


def batch_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    mean: ArrayLike,
    variance: ArrayLike,
    *,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    axis: int | list[int] = -1,
    epsilon: float = 1e-3,
    mask: ArrayLike | None = None,
    training: bool = True,
    out: Any = None,
    allreduce: Allreduce | None = None,
    activation: str | None = None,
    activation_alpha: float = 0.01,
    clip: tuple[float, float] | None = None,
    residual: ArrayLike | None = None,
    output: ArrayLike | None = None,
) -> tuple[np.ndarray, ...]:
    """Gradients of ``y = (x - mean) / sqrt(variance + epsilon) * gamma + beta``, or of
    ``y = act(that + residual)`` with the fused epilogue's arguments (module docstring).

    ``dy`` is the gradient of the loss with respect to ``y`` (the shape of ``x``).
    With ``training=True`` the derivative goes through the batch statistics, so
    ``mean`` and ``variance`` must be the ones the forward computed from ``x``
    (with the same ``mask``: masked positions are normalized with, and so still
    depend on, the statistics of the used ones). With ``training=False`` they are
    held fixed (an inference call). ``out`` receives ``dx`` and may be ``dy`` or
    ``x`` itself (in place).

    With an epilogue, pass the forward's ``beta`` and epilogue arguments: the gradients
    below are for ``g = dy·act'(z)``, ``z = bn(x) + residual``. ``output``, the forward's
    ``y`` (optional), lets relu, relu6, leaky_relu and clip read ``act'`` from it.

    With ``allreduce`` and ``training=True``, ``mean`` and ``variance`` are the
    global statistics a synchronized :func:`batch_norm_train` returned, and ``dx``
    goes through them: this rank's used counts, ``Σg`` and ``Σg·x̂`` are summed
    across ranks in exactly one call of ``allreduce``. ``dgamma`` and ``dbeta`` stay
    this rank's own (summing parameter gradients is the optimizer's job, as for every
    other weight). With ``training=False`` nothing is communicated. If ``allreduce``
    raises, ``out`` is untouched.

    Returns ``(dx, dgamma, dbeta)``, or ``(dx, dgamma, dbeta, dresidual)`` when
    ``residual`` is given: ``dx`` in the input's dtype, ``dgamma = Σ g·x̂`` and ``dbeta =
    Σ g`` over every position, in the channel shape, ``dresidual = g`` in the input's dtype.

    >>> import numpy as np, cbn
    >>> x = np.array([[1.0], [3.0]])
    >>> y, mean, variance = cbn.ops.batch_norm_train(x, epsilon=0.0)  # y = [[-1], [1]]
    >>> dx, dgamma, dbeta = cbn.ops.batch_norm_backward(np.array([[1.0], [0.0]]), x, mean,
    ...                                                 variance, epsilon=0.0)
    >>> dx.ravel(), dgamma, dbeta
    (array([0., 0.]), array([-1.]), array([1.]))
    >>> dx, dgamma, dbeta, dresidual = cbn.ops.batch_norm_backward(
    ...     np.array([[1.0], [2.0]]), x, mean, variance, epsilon=0.0, activation="relu",
    ...     residual=np.array([[0.5], [0.5]]))  # z = [[-0.5], [1.5]]
    >>> dgamma, dbeta, dresidual.ravel()
    (array([2.]), array([2.]), array([0., 2.]))
    """
    if (mask is None and allreduce is None and beta is None and residual is None
            and output is None):
        fast: tuple[np.ndarray, np.ndarray, np.ndarray] | None = _core.backward_fast(
            dy, x, mean, variance, gamma, axis, epsilon, training, out, activation,
            activation_alpha, clip)
        if fast is not None:
            return fast
    arr, axes, cshape, eps = _prepare(x, axis, epsilon)
    grad = input_like(dy, arr, "dy")
    mu, var = _required_statistics(as_param(mean, cshape, "mean"),
                                   as_param(variance, cshape, "variance"))
    g, b = as_param(gamma, cshape, "gamma"), as_param(beta, cshape, "beta")
    m = canonical_mask(mask, arr.shape)
    check_allreduce(allreduce)
    epi = epilogue(arr, activation, activation_alpha, clip, residual)
    forward_y = None if output is None else input_like(output, arr, "output")
    dx = _output(arr, out, grad)
    sum_dy, sum_dy_xhat, dresidual = _backward(allreduce, grad, arr, dx, axes, m, mu, var, g,
                                               b, eps, bool(training), epi, forward_y)
    grads = (dx, *_channel_stats(arr, cshape, sum_dy_xhat, sum_dy))
    return grads if dresidual is None else (*grads, dresidual)


def fold(
    weight: ArrayLike,
    bias: ArrayLike | None,
    mean: ArrayLike,
    variance: ArrayLike,
    *,
    gamma: ArrayLike | None = None,
    beta: ArrayLike | None = None,
    epsilon: float = 1e-3,
    axis: int = -1,
    out: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold an inference batch normalization into the linear layer before it.

    Returns ``(new_weight, new_bias)`` such that the layer with them computes
    ``bn(layer(x))``: with ``s = gamma / sqrt(variance + epsilon)`` per output channel,
    ``new_weight = weight * s`` along ``axis`` (the weight's output-channel axis: ``-1``
    for Keras' ``(in, out)`` and ``(kh, kw, in, out)``, ``0`` for PyTorch's ``(out, in)``
    and ``(out, in, kh, kw)``) and ``new_bias = (bias - mean) * s + beta``. ``bias``,
    ``gamma``, ``beta`` may be None (0, 1, 0). The factors are computed in float64;
    ``new_weight`` has the weight's dtype (``out=weight`` folds in place), ``new_bias``
    is float64 for float64 weights, float32 otherwise.

    >>> import numpy as np, cbn
    >>> w, b = cbn.ops.fold(np.array([[1.0, 2.0]]), None, mean=[1.0, 0.0],
    ...                     variance=[4.0, 1.0], epsilon=0.0)
    >>> w, b
    (array([[0.5, 2. ]]), array([-0.5,  0. ]))
    """
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
        raise TypeError(f"axis must be one int (the output-channel axis); received {axis!r}")
    arr, axes, cshape, eps = _prepare(weight, axis, epsilon)
    b, mu, var, g, be = (as_param(v, cshape, n) for v, n in (
        (bias, "bias"), (mean, "mean"), (variance, "variance"), (gamma, "gamma"),
        (beta, "beta")))
    mu, var = _required_statistics(mu, var)
    new_weight = _output(arr, out)
    new_bias = _core.fold(arr, new_weight, axes[0], b, mu, var, g, be, eps)
    return new_weight, _channel_result(arr, cshape, new_bias)
