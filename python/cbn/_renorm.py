"""The per-channel corrections of a training call: batch renormalization (``r``, ``d``
and its clipping), tf.keras 2's ``adjustment``, their composition into one affine, and
the moving-average updates. The NumPy layer computes them in float64; ``cbn.keras``
runs the same functions on backend tensors (``xp=keras.ops``), in Keras' float32.

See "Batch renormalization" and "adjustment" in ``docs/behaviour.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ._keras_objects import real_number
from ._validate import as_array, as_param

__all__ = [
    "CLIPPING_KEYS",
    "check_renorm_clipping",
    "ema",
    "training_affine",
    "renorm_correction",
    "adjustment_values",
    "moving_updates",
]

CLIPPING_KEYS = ("rmax", "rmin", "dmax")


def check_renorm_clipping(clipping: Any) -> dict[str, Any]:
    """Keys ⊆ {rmax, rmin, dmax}, rmax ≥ rmin, dmax ≥ 0 (None values: no clip)."""
    if clipping is None:
        return {}
    if not isinstance(clipping, Mapping):
        raise TypeError(f"renorm_clipping must be a dict or None; received {clipping!r}")
    unknown = sorted(set(clipping) - set(CLIPPING_KEYS), key=str)
    if unknown:
        raise ValueError(
            f"renorm_clipping has unknown keys {unknown} in {dict(clipping)!r}; "
            f"expected a subset of {list(CLIPPING_KEYS)}"
        )
    bounds = {
        key: None if value is None else real_number(value, f"renorm_clipping[{key!r}]")
        for key, value in clipping.items()
    }
    rmax, rmin, dmax = (bounds.get(key) for key in CLIPPING_KEYS)
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(f"renorm_clipping needs rmax >= rmin; received rmax={rmax}, rmin={rmin}")
    if dmax is not None and dmax < 0:
        raise ValueError(f"renorm_clipping needs dmax >= 0; received dmax={dmax}")
    return dict(clipping)


def ema(current: Any, batch: Any, momentum: float) -> Any:
    """``current·m + batch·(1 − m)``."""
    return current * momentum + batch * (1.0 - momentum)


def training_affine(
    gamma: np.ndarray,
    beta: np.ndarray,
    r: np.ndarray,
    d: np.ndarray,
    adjust_scale: np.ndarray,
    adjust_bias: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(scale, shift)`` with ``y = x̂·scale + shift`` for
    ``y = ((x̂·r + d)·a_scale + a_bias)·γ + β``, so a training call stays one normalize
    pass whatever corrections it composes (r = 1, d = 0 without renorm; a_scale = 1,
    a_bias = 0 without adjustment)."""
    return gamma * r * adjust_scale, gamma * (d * adjust_scale + adjust_bias) + beta


def renorm_correction(
    mean: np.ndarray,
    variance: np.ndarray,
    renorm_mean: np.ndarray,
    renorm_stddev: np.ndarray,
    epsilon: float,
    clipping: Mapping[str, float | None],
    xp: Any = np,
) -> tuple[np.ndarray, np.ndarray]:
    """Batch renormalization's ``r`` and ``d`` from the pre-update renorm statistics,
    clipped to ``[rmin, rmax]`` and ``[-dmax, dmax]``; ``xp`` is the array module
    (NumPy, or ``keras.ops`` for backend tensors)."""
    stddev = xp.sqrt(variance + epsilon)
    renorm_stddev = xp.maximum(renorm_stddev, float(np.sqrt(epsilon)))
    r = stddev / renorm_stddev
    d = (mean - renorm_mean) / renorm_stddev
    rmax, rmin, dmax = (clipping.get(key) for key in CLIPPING_KEYS)
    if rmin is not None:
        r = xp.maximum(r, rmin)
    if rmax is not None:
        r = xp.minimum(r, rmax)
    if dmax is not None:
        d = xp.clip(d, -dmax, dmax)
    return r, d


def adjustment_values(
    adjustment: Callable[[tuple[int, ...]], Any] | None,
    input_shape: tuple[int, ...],
    channel_shape: tuple[int, ...],
) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """``adjustment(input_shape)`` as per-channel float64 ``(a_scale, a_bias)``;
    ``(None, None)`` without an adjustment. Each returned value is a scalar or one value
    per channel (the channel shape, optionally with extra size-1 dims)."""
    if adjustment is None:
        return None, None
    pair = adjustment(tuple(input_shape))
    if isinstance(pair, (tuple, list)) and len(pair) == 2:
        return (
            _per_channel_adjustment(pair[0], "scale", channel_shape),
            _per_channel_adjustment(pair[1], "bias", channel_shape),
        )
    received = (
        f"a {type(pair).__name__} of length {len(pair)}"
        if isinstance(pair, (tuple, list))
        else f"an object of type {type(pair).__name__}"
    )
    raise TypeError(f"adjustment(shape) must return a pair (scale, bias); received {received}")


def _per_channel_adjustment(value: Any, role: str, channel_shape: tuple[int, ...]) -> np.ndarray:
    name = f"the {role} returned by adjustment (a scalar or one value per channel)"
    arr = as_array(value, name)
    if arr.size == 1:  # one value for every channel
        arr = np.broadcast_to(arr.reshape(()), channel_shape)
    result = as_param(arr, channel_shape, name)
    assert result is not None  # as_param returns None only for None
    return result


def moving_updates(
    current: Mapping[str, np.ndarray],
    mean: np.ndarray,
    variance: np.ndarray,
    *,
    momentum: float,
    epsilon: float,
    renorm_momentum: float | None,
    xp: Any = np,
) -> dict[str, np.ndarray]:
    """The new moving statistics (and renorm's, when ``renorm_momentum`` is given) for
    a batch's per-channel ``mean`` and ``variance``, computed from ``current``: NumPy
    weights (read as flat float64), or with ``xp=keras.ops`` tensors of the statistics'
    dtype and shape."""
    if xp is np:
        current = {name: np.asarray(value, np.float64).reshape(-1)
                   for name, value in current.items()}
    new = {"moving_mean": ema(current["moving_mean"], mean, momentum)}
    if renorm_momentum is None:
        new["moving_variance"] = ema(current["moving_variance"], variance, momentum)
        return new
    stddev = xp.sqrt(variance + epsilon)
    moving_stddev = ema(current["moving_stddev"], stddev, momentum)
    new["moving_stddev"] = moving_stddev
    new["moving_variance"] = xp.maximum(moving_stddev * moving_stddev - epsilon, 0.0)
    new["renorm_mean"] = ema(current["renorm_mean"], mean, renorm_momentum)
    new["renorm_stddev"] = ema(current["renorm_stddev"], stddev, renorm_momentum)
    return new
