"""Fused epilogues of ``cbn.ops``: ``y = act(bn(x) + residual)`` in the normalize sweep.

The Python arguments (``activation``, ``activation_alpha``, ``clip``, ``residual``) are
checked here and turned into the tuple the core takes, ``(code, alpha, lo, hi,
residual)``; every error names the bad value and says what was expected.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
from numpy.typing import ArrayLike

from . import _core
from ._validate import as_array, short_repr

#: Activation names and the core's codes (its ``bn_activation`` enum), as the ``_fast``
#: paths of ``_core`` read them.
ACTIVATIONS: dict[str, int] = _core.ACTIVATIONS
_IDENTITY, _CLIP = ACTIVATIONS["identity"], ACTIVATIONS["clip"]

#: What the core takes: (activation code, alpha, lo, hi, residual or None).
Epilogue = tuple[int, float, float, float, np.ndarray | None]


def input_like(value: ArrayLike, x: np.ndarray, name: str) -> np.ndarray:
    """``value`` checked to have the input's shape, in the input's dtype."""
    arr = as_array(value, name)
    if arr.shape != x.shape:
        raise ValueError(f"{name} has shape {arr.shape}; expected the input's shape {x.shape}")
    return arr if arr.dtype == x.dtype else arr.astype(x.dtype)


def _code(activation: str | None) -> int:
    if activation is None:
        return _IDENTITY
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str or None; received {short_repr(activation)}")
    code = ACTIVATIONS.get(activation)
    if code is None:
        names = ", ".join(repr(n) for n in ACTIVATIONS)
        raise ValueError(
            f"activation={short_repr(activation)} is not an activation cbn fuses; expected "
            f"None or one of {names}"
        )
    return code


def _real(value: object, name: str) -> float:
    """``value`` as a float: a real number (not bool), and not NaN."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; received {short_repr(value)}")
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"{name} must not be NaN")
    return number


def _alpha(alpha: object) -> float:
    value = _real(alpha, "activation_alpha")
    if math.isinf(value):
        raise ValueError(f"activation_alpha must be finite; received {value!r}")
    return value


def _bounds(code: int, clip: object) -> tuple[float, float]:
    """``clip``'s ``(lo, hi)`` for the "clip" activation; ``(0, 0)`` (unused) otherwise."""
    if code != _CLIP:
        if clip is not None:
            raise ValueError(
                f"clip={short_repr(clip)} is given but activation is not 'clip'; pass "
                "activation='clip' with it, or leave clip=None"
            )
        return 0.0, 0.0
    if clip is None:
        raise ValueError("activation='clip' needs clip=(lo, hi), the bounds; received None")
    if not isinstance(clip, (tuple, list)) or len(clip) != 2:
        raise ValueError(f"clip must be a pair (lo, hi) of numbers; received {short_repr(clip)}")
    lo, hi = _real(clip[0], "clip's lo"), _real(clip[1], "clip's hi")
    if lo > hi:
        raise ValueError(f"clip=(lo, hi) needs lo <= hi; received lo={lo!r} > hi={hi!r}")
    return lo, hi


def epilogue(
    x: np.ndarray, activation: str | None, alpha: object, clip: object,
    residual: ArrayLike | None,
) -> Epilogue | None:
    """The core's epilogue tuple for input ``x``, or None when there is nothing to fuse
    (no activation, or the identity, and no residual). ``residual`` is read in ``x``'s
    dtype (a copy if it has another) and must have ``x``'s shape."""
    code = _code(activation)
    lo, hi = _bounds(code, clip)
    slope = _alpha(alpha)
    res = None if residual is None else input_like(residual, x, "residual")
    if code == _IDENTITY and res is None:
        return None
    return code, slope, lo, hi, res
