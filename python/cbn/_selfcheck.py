"""Self-check of :class:`cbn.BatchNormalization` against a float64 NumPy reference
(run by ``python -m cbn``).

Each case builds a layer with random gamma, beta and moving statistics, then checks a
training call (batch statistics), the moving-statistics update and
an inference call (moving statistics). Errors are reported in units of the
output's unit roundoff ``u`` relative to ``max(1, |y|)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_dtypes
import numpy as np

from .layer import BatchNormalization

EPSILON = 1e-3
MOMENTUM = 0.9
#: Allowed error, in units of u * max(1, |y|): 4 float32 ulp (kernels.md's accuracy target);
#: float64 statistics sum many values, with an error growing like sqrt(n) * u.
MAX_ERROR_U = 8.0
MAX_ERROR_U_FLOAT64 = 64.0
#: Extra allowance for 16-bit outputs: one unit in their last place.
SIXTEEN_BIT_MANTISSA = {np.dtype(np.float16): 10, np.dtype(ml_dtypes.bfloat16): 7}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    shape: tuple[int, ...]
    axis: int | list[int]
    dtype: str = "float32"  # layer dtype policy; the input has the policy's compute dtype
    mask: str | None = None  # None, "a" (input shape minus last axis) or "b" (broadcastable)
    view: Callable[[np.ndarray], np.ndarray] | None = None  # a view of the generated data
    loc: float = 1.5  # data mean, in units of its standard deviation
    seed: int = 0


CASES = [
    Case("NHWC, axis=-1", (8, 6, 6, 16), -1),
    Case("NCHW, axis=1", (8, 16, 6, 6), 1),
    Case("axis=[1, 3]", (4, 5, 6, 7), [1, 3]),
    Case("mask (B, T) for (B, T, F)", (8, 12, 16), -1, mask="a"),
    Case("mask broadcast, NCHW", (8, 16, 6, 6), 1, mask="b"),
    Case("float16 policy", (8, 6, 6, 16), -1, dtype="float16"),
    Case("mixed_bfloat16 policy", (16, 40), -1, dtype="mixed_bfloat16"),
    Case("float64 policy", (64, 12), 0, dtype="float64"),
    Case("reversed, strided view", (16, 10, 24), -1, view=lambda x: x[::-1, :, ::2]),
    Case("mean/std = 1e5", (256, 32), -1, loc=1e5),
]


# ---------------------------------------------------------------------------- reference


def _axes(axis, rank: int) -> tuple[int, ...]:
    return tuple(sorted(a % rank for a in ([axis] if isinstance(axis, int) else axis)))


def reference_moments(x: np.ndarray, axes, used: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Masked per-channel mean and biased variance in float64, keepdims shape."""
    red = tuple(i for i in range(x.ndim) if i not in axes)
    n = used.sum(axis=red, keepdims=True)
    mean = np.where(used, x, 0.0).sum(axis=red, keepdims=True) / np.maximum(n, 1)
    var = np.where(used, (x - mean) ** 2, 0.0).sum(axis=red, keepdims=True) / np.maximum(n, 1)
    return np.where(n > 0, mean, 0.0), np.where(n > 0, var, 0.0)


def reference_normalize(x, mean, var, gamma, beta) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps) * gamma + beta`` in float64, arguments broadcastable."""
    return (x - mean) * (gamma / np.sqrt(var + EPSILON)) + beta


def error_in_u(y: np.ndarray, y_ref: np.ndarray) -> float:
    """Largest error in units of u*max(1, |y_ref|); 16-bit outputs are first allowed one
    unit in their last place (a result computed in float32 and rounded once)."""
    dt = y.dtype
    err = np.abs(y.astype(np.float64) - y_ref)
    if dt in SIXTEEN_BIT_MANTISSA:
        a = np.maximum(np.abs(y_ref), np.finfo(np.float32).tiny)
        ulp16 = np.exp2(np.floor(np.log2(a)) - SIXTEEN_BIT_MANTISSA[dt])
        err = np.maximum(err - ulp16, 0.0)
        dt = np.dtype(np.float32)  # the arithmetic is float32
    u = np.finfo(dt).eps / 2
    return float((err / (u * np.maximum(1.0, np.abs(y_ref)))).max(initial=0.0))


# ---------------------------------------------------------------------------- one case


def _input_dtype(policy: str) -> np.dtype:
    names = {"float16": np.float16, "float64": np.float64, "mixed_bfloat16": ml_dtypes.bfloat16}
    return np.dtype(names.get(policy, np.float32))


def run_case(case: Case) -> tuple[bool, str]:
    """Run one case; returns (passed, one-line detail)."""
    rng = np.random.default_rng(case.seed)
    std = 2.5
    base = (std * (case.loc + rng.standard_normal(case.shape))).astype(_input_dtype(case.dtype))
    x = base if case.view is None else case.view(base)
    x64 = x.astype(np.float64)
    axes = _axes(case.axis, x.ndim)
    cshape = tuple(x.shape[a] for a in axes)
    keep = tuple(x.shape[i] if i in axes else 1 for i in range(x.ndim))

    mask = None
    used = np.ones(x.shape, dtype=bool)
    if case.mask == "a":
        mask = rng.random(x.shape[:-1]) < 0.6
        used = np.broadcast_to(mask[..., None], x.shape)
    elif case.mask == "b":
        mask = rng.random((x.shape[0],) + (1,) * (x.ndim - 1)) < 0.6
        mask[0] = True
        used = np.broadcast_to(mask, x.shape)

    gamma = rng.uniform(0.5, 2.0, cshape)
    beta = rng.uniform(-1.0, 1.0, cshape)
    moving_mean = rng.uniform(-1.0, 1.0, cshape)
    moving_var = rng.uniform(0.5, 2.0, cshape)
    layer = BatchNormalization(axis=case.axis, momentum=MOMENTUM, epsilon=EPSILON,
                               dtype=case.dtype)
    layer.build(x.shape)
    layer.set_weights([gamma, beta, moving_mean, moving_var])
    # The reference uses the weights as the layer stores them (float32 unless "float64").
    g, b, mm, mv = (np.asarray(w, dtype=np.float64).reshape(keep) for w in layer.get_weights())

    y_train = np.asarray(layer(x, training=True, mask=mask))
    mean, var = reference_moments(x64, axes, used)
    train_err = error_in_u(y_train, reference_normalize(x64, mean, var, g, b))

    want_mm = mm * MOMENTUM + mean * (1 - MOMENTUM)
    want_mv = mv * MOMENTUM + var * (1 - MOMENTUM)
    got_mm = np.asarray(layer.moving_mean, dtype=np.float64).reshape(keep)
    got_mv = np.asarray(layer.moving_variance, dtype=np.float64).reshape(keep)
    w_u = np.finfo(np.asarray(layer.moving_mean).dtype).eps / 2
    moving_err = max(
        float((np.abs(got_mm - want_mm) / (w_u * np.maximum(np.abs(want_mm), std))).max()),
        float((np.abs(got_mv - want_mv) / (w_u * np.maximum(want_mv, 1.0))).max()),
    )

    y_infer = np.asarray(layer(x))
    infer_err = error_in_u(y_infer, reference_normalize(x64, got_mm, got_mv, g, b))

    limit = MAX_ERROR_U_FLOAT64 if x.dtype == np.float64 else MAX_ERROR_U
    passed = max(train_err, moving_err, infer_err) <= limit and y_train.shape == x.shape
    detail = (f"train {train_err:4.1f}u  moving stats {moving_err:4.1f}u  "
              f"inference {infer_err:4.1f}u  -> {y_train.dtype}")
    return passed, detail


def run_selfcheck(write: Callable[[str], None] = print) -> bool:
    """Run every case, write one PASS/FAIL line each; True when all passed."""
    write(f"Self-check of cbn.BatchNormalization against float64 NumPy (error allowed: "
          f"{MAX_ERROR_U:g}u * max(1, |y|), {MAX_ERROR_U_FLOAT64:g}u for float64)")
    all_passed = True
    width = max(len(c.name) for c in CASES)
    for case in CASES:
        try:
            passed, detail = run_case(case)
        except Exception as err:  # a crash is a failure of that case, reported as such
            passed, detail = False, f"{type(err).__name__}: {err}"
        all_passed &= passed
        write(f"  {'PASS' if passed else 'FAIL'}  {case.name:<{width}}  {detail}")
    return all_passed
