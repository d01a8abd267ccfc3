"""``cbn.BatchNormalization``: a Keras-compatible batch normalization layer on NumPy
arrays, following ``shared/spec/behaviour.md`` (rules cited as R1 ... R13).

All per-channel arithmetic (statistics, renorm corrections, moving-average updates)
is float64; weights are stored in the policy's variable dtype. The batch mean is
handed to the core in float64, never rounded to the input dtype first, which keeps
the output exact for data whose mean is large relative to its spread (R4.2).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
from numpy.lib.stride_tricks import as_strided
from numpy.typing import ArrayLike

from . import _core
from ._keras_objects import (
    CONSTRAINTS,
    INITIALIZERS,
    REGULARIZERS,
    DTypePolicy,
    check_config_mapping,
    construct_from_config,
    get_policy,
    real_number,
    serialize_policy,
)
from ._validate import (
    as_array,
    as_param,
    canonical_mask,
    channel_shape,
    check_axis_arg,
    check_epsilon,
    is_integer,
    normalize_axes,
)
from .distributed import Allreduce, resolve_allreduce, sum_across_ranks

__all__ = ["BatchNormalization"]

_TRAINABLE = ("gamma", "beta")
_RENORM_WEIGHTS = ("moving_stddev", "renorm_mean", "renorm_stddev")
_CLIPPING_KEYS = ("rmax", "rmin", "dmax")
# Base-layer keys Keras and tf.keras may write that carry no state of this layer
# (shape hints for the input layer of a Sequential model).
_SHAPE_HINT_KEYS = ("batch_input_shape", "batch_shape", "input_shape", "input_dim")

_names_lock = threading.Lock()
_name_counts: dict[str, int] = {}


def _unique_name(cls: type) -> str:
    """Keras' automatic names: ``batch_normalization``, ``batch_normalization_1``, ..."""
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()
    with _names_lock:
        count = _name_counts.get(prefix, 0)
        _name_counts[prefix] = count + 1
    return prefix if count == 0 else f"{prefix}_{count}"


def _check_bool(value, name: str, error: type[Exception] = TypeError) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise error(f"{name} must be a bool; received {value!r} of type {type(value).__name__}")
    return bool(value)


def _check_renorm_clipping(clipping) -> dict[str, Any]:
    """R1.4: keys ⊆ {rmax, rmin, dmax}, rmax ≥ rmin, dmax ≥ 0 (None values: no clip)."""
    if clipping is None:
        return {}
    if not isinstance(clipping, Mapping):
        raise TypeError(f"renorm_clipping must be a dict or None; received {clipping!r}")
    unknown = sorted(set(clipping) - set(_CLIPPING_KEYS), key=str)
    if unknown:
        raise ValueError(
            f"renorm_clipping has unknown keys {unknown} in {dict(clipping)!r}; "
            f"expected a subset of {list(_CLIPPING_KEYS)}"
        )
    bounds = {
        key: None if value is None else real_number(value, f"renorm_clipping[{key!r}]")
        for key, value in clipping.items()
    }
    rmax, rmin, dmax = (bounds.get(key) for key in _CLIPPING_KEYS)
    if rmax is not None and rmin is not None and rmax < rmin:
        raise ValueError(f"renorm_clipping needs rmax >= rmin; received rmax={rmax}, rmin={rmin}")
    if dmax is not None and dmax < 0:
        raise ValueError(f"renorm_clipping needs dmax >= 0; received dmax={dmax}")
    return dict(clipping)


def _ema(current: np.ndarray, batch: np.ndarray, momentum: float) -> np.ndarray:
    """``current·m + batch·(1 − m)`` in float64 (R5.1, R11)."""
    return current.astype(np.float64).reshape(-1) * momentum + batch * (1.0 - momentum)


def _ghost_view(a: np.ndarray, virtual_batch_size: int) -> np.ndarray:
    """R12's ``(V, B/V, ...)`` view of ``a`` (batch first), without a copy.

    Element ``[i, g, ...]`` is sample ``i·(B/V) + g``: axis 1 indexes the ghost batch
    ``{b : b mod (B/V) = g}`` and axis 0 its members. Any strides allow this view, unlike
    a reshape. A size-1 batch axis (a mask broadcast over the batch) stays broadcast.
    """
    if a.shape[0] == 1:
        return a[np.newaxis]
    ghosts = a.shape[0] // virtual_batch_size
    stride = a.strides[0]
    return as_strided(
        a, (virtual_batch_size, ghosts) + a.shape[1:], (stride * ghosts, stride) + a.strides[1:]
    )


def _training_affine(
    gamma: np.ndarray,
    beta: np.ndarray,
    r: np.ndarray,
    d: np.ndarray,
    adjust_scale: np.ndarray,
    adjust_bias: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel ``(scale, shift)`` with ``y = x̂·scale + shift`` for R13's
    ``y = ((x̂·r + d)·a_scale + a_bias)·γ + β``, so a training call stays one normalize
    pass whatever corrections it composes (r = 1, d = 0 without renorm; a_scale = 1,
    a_bias = 0 without adjustment)."""
    return gamma * r * adjust_scale, gamma * (d * adjust_scale + adjust_bias) + beta


class _KernelView(NamedTuple):
    """The arrays and kept axes a training call hands to the core.

    With ``virtual_batch_size`` these are R12's ghost views and the kept axes are the
    ghost axis 1 plus the channel axes shifted by one, so the core computes statistics
    and normalizes per (ghost batch, channel); otherwise they are the call's own arrays.
    """

    x: np.ndarray
    y: np.ndarray
    mask: np.ndarray | None
    axes: tuple[int, ...]
    ghosts: int
    virtual_batch_size: int | None  # the ghost view's V; None: the arrays as called


class _ForwardRecord(NamedTuple):
    """What one call used, i.e. what its derivative (R15) depends on: the kernel's
    view, the statistics it normalized with (per kept index: per (ghost, channel)),
    whether they were the batch's (training) or constants (inference), the batch's
    per-channel statistics (ghost averages, R12; the moving updates' input) and the
    per-channel γ and constants r, d, a_scale, a_bias of R11 and R13. All float64;
    None for γ (scale=False) and for the constants of an inference call (1, 0, 1, 0).
    The view holds the call's input by reference."""

    view: _KernelView
    through_stats: bool
    allreduce: Allreduce | None  # synchronized statistics: the backward's collective too
    mean: np.ndarray
    variance: np.ndarray
    batch_mean: np.ndarray
    batch_variance: np.ndarray
    gamma: np.ndarray | None
    r: np.ndarray | None
    d: np.ndarray | None
    adjust_scale: np.ndarray | None
    adjust_bias: np.ndarray | None


def _is_built_tf_keras2_ghost_config(config: Mapping[str, Any]) -> bool:
    """Whether ``config`` is a built tf.keras 2 ghost-batch layer's, whose ``axis`` is off
    by one: tf.keras 2 shifts its axes in place at build to index its ``(V, B/V, ...)``
    view and writes them so (its own ``from_config`` then fails or picks the wrong axis).

    tf.keras 2 writes ``virtual_batch_size`` only when set and never ``synchronized``,
    which cbn and Keras 3 always write; built, its axes are a list of ints >= 2 (the
    user's axes exclude 0). An unbuilt tf.keras 2 layer given such a list is
    indistinguishable, and is read as built: saved models hold built layers.
    """
    axis = config.get("axis")
    return (
        config.get("virtual_batch_size") is not None
        and "synchronized" not in config
        and isinstance(axis, (list, tuple))
        and len(axis) > 0
        and all(is_integer(a) and a >= 2 for a in axis)
    )


def _weight_property(name: str) -> property:
    def get(self) -> np.ndarray | None:
        return self._weights.get(name)

    return property(get, doc=f"The ``{name}`` weight (None before build or when disabled).")


class BatchNormalization:
    """Batch normalization layer, compatible with ``keras.layers.BatchNormalization``.

    Training (``training=True`` and ``trainable``) normalizes with the batch
    statistics and updates the moving ones; otherwise the moving statistics are
    used. ``layer(x)`` returns a NumPy array of the input's shape in the layer's
    compute dtype. Weights are NumPy arrays updated in place, so references to
    ``layer.moving_mean`` etc. stay current. Safe to call from several threads.
    """

    gamma = _weight_property("gamma")
    beta = _weight_property("beta")
    moving_mean = _weight_property("moving_mean")
    moving_variance = _weight_property("moving_variance")
    moving_stddev = _weight_property("moving_stddev")
    renorm_mean = _weight_property("renorm_mean")
    renorm_stddev = _weight_property("renorm_stddev")

    def __init__(
        self,
        axis: int | Sequence[int] = -1,
        momentum: float = 0.99,
        epsilon: float = 1e-3,
        center: bool = True,
        scale: bool = True,
        beta_initializer: Any = "zeros",
        gamma_initializer: Any = "ones",
        moving_mean_initializer: Any = "zeros",
        moving_variance_initializer: Any = "ones",
        beta_regularizer: Any = None,
        gamma_regularizer: Any = None,
        beta_constraint: Any = None,
        gamma_constraint: Any = None,
        synchronized: bool = False,
        renorm: bool = False,
        renorm_clipping: Mapping[str, float] | None = None,
        renorm_momentum: float = 0.99,
        fused: bool | None = None,
        virtual_batch_size: int | None = None,
        adjustment: Callable | None = None,
        allreduce: Callable | None = None,
        trainable: bool = True,
        name: str | None = None,
        dtype: Any = None,
    ) -> None:
        """Arguments as ``keras.layers.BatchNormalization`` plus tf.keras 2's
        ``fused``, ``virtual_batch_size`` and ``adjustment``, and ``allreduce`` (the
        callback for ``synchronized``).

        ``axis`` is an int or a list/tuple of ints (R1.1); initializers, regularizers
        and constraints are names, Keras config dicts or callables (R1.2, R1.3);
        ``dtype`` is None, a policy name or a Keras policy config (R7). ``fused``
        (None/True/False) is accepted and ignored: every cbn path is fused (R1.5).
        ``virtual_batch_size=V`` normalizes each ghost batch of V strided samples with
        its own statistics in training (R12). ``adjustment(shape) -> (scale, bias)``,
        called with the input's shape in training, gives a scalar or per-channel scale
        and bias applied to the normalized values before γ and β (R13).
        """
        self.axis = check_axis_arg(axis)
        self.momentum = real_number(momentum, "momentum")
        self.epsilon = check_epsilon(epsilon)
        self.center = _check_bool(center, "center")
        self.scale = _check_bool(scale, "scale")
        self.beta_initializer = INITIALIZERS.get(beta_initializer)
        self.gamma_initializer = INITIALIZERS.get(gamma_initializer)
        self.moving_mean_initializer = INITIALIZERS.get(moving_mean_initializer)
        self.moving_variance_initializer = INITIALIZERS.get(moving_variance_initializer)
        for init_name in ("beta", "gamma", "moving_mean", "moving_variance"):
            if getattr(self, f"{init_name}_initializer") is None:
                raise ValueError(f"{init_name}_initializer must not be None")
        self.beta_regularizer = REGULARIZERS.get(beta_regularizer)
        self.gamma_regularizer = REGULARIZERS.get(gamma_regularizer)
        self.beta_constraint = CONSTRAINTS.get(beta_constraint)
        self.gamma_constraint = CONSTRAINTS.get(gamma_constraint)
        self.synchronized = _check_bool(synchronized, "synchronized")
        self.renorm = _check_bool(renorm, "renorm")
        # Like Keras, the clipping is only validated (and None made {}) with renorm.
        if self.renorm:
            self.renorm_clipping = _check_renorm_clipping(renorm_clipping)
        else:
            self.renorm_clipping = renorm_clipping
        self.renorm_momentum = real_number(renorm_momentum, "renorm_momentum")
        # R1.5: every cbn path is the fused kernel, so unlike tf.keras 2 no combination
        # of fused=True with other arguments or input ranks is refused.
        if fused is not None and not isinstance(fused, (bool, np.bool_)):
            raise TypeError(f"fused must be None, True or False; received {fused!r}")
        self.fused = None if fused is None else bool(fused)
        if virtual_batch_size is not None and not (
            is_integer(virtual_batch_size) and virtual_batch_size > 0
        ):
            raise ValueError(
                f"virtual_batch_size must be a positive int; received {virtual_batch_size!r}"
            )
        self.virtual_batch_size = virtual_batch_size
        if adjustment is not None and not callable(adjustment):
            raise TypeError(
                "adjustment must be a callable adjustment(shape) -> (scale, bias) or None; "
                f"received {adjustment!r}"
            )
        self.adjustment = adjustment
        if allreduce is not None and not callable(allreduce):
            raise TypeError(f"allreduce must be a callable or None; received {allreduce!r}")
        self.allreduce = allreduce
        self._trainable = _check_bool(trainable, "trainable", ValueError)
        self._policy = get_policy(dtype)
        if virtual_batch_size is not None and adjustment is not None:
            raise ValueError(  # R1.5
                "virtual_batch_size and adjustment cannot be combined; "
                f"received virtual_batch_size={virtual_batch_size!r} and adjustment={adjustment!r}"
            )
        if virtual_batch_size is not None and self.synchronized:
            raise ValueError(  # R14.1
                "synchronized=True cannot be combined with virtual_batch_size="
                f"{virtual_batch_size!r}"
            )
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str or None; received {name!r}")
        self.name = name if name is not None else _unique_name(type(self))

        self.built = False
        self._weights: dict[str, np.ndarray] = {}
        self._axes: tuple[int, ...] = ()
        self._input_rank = 0
        self._channel_shape: tuple[int, ...] = ()
        # Guards the weights: snapshots for a call, commits of updates, build.
        self._lock = threading.RLock()
        self._last_call: _ForwardRecord | None = None
        #: Gradients of the last :meth:`backward`, aligned with :attr:`trainable_weights`.
        self.gradients: list[np.ndarray] = []

    # ------------------------------------------------------------------ dtypes (R7)

    @property
    def dtype_policy(self) -> DTypePolicy:
        return self._policy

    @property
    def dtype(self) -> str:
        """The weights' dtype (as Keras 3's ``Layer.dtype``)."""
        return self._policy.variable_dtype.name

    @property
    def variable_dtype(self) -> str:
        return self._policy.variable_dtype.name

    @property
    def compute_dtype(self) -> str:
        """The dtype inputs are cast to and outputs are returned in."""
        return self._policy.compute_dtype.name

    # ------------------------------------------------------------------ weights (R2.2, R3.2, R9)

    @property
    def trainable(self) -> bool:
        """When False the layer always runs in inference mode and has no trainable weights."""
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self._trainable = _check_bool(value, "trainable", ValueError)

    @property
    def weights(self) -> list[np.ndarray]:
        """gamma, beta, moving_mean, moving_variance (+ renorm's), the present ones."""
        return list(self._weights.values())

    @property
    def trainable_weights(self) -> list[np.ndarray]:
        return [w for _, w in self._trainable_items()]

    def _trainable_items(self) -> list[tuple[str, np.ndarray]]:
        if not self._trainable:
            return []
        return [(name, w) for name, w in self._weights.items() if name in _TRAINABLE]

    @property
    def non_trainable_weights(self) -> list[np.ndarray]:
        if not self._trainable:
            return self.weights
        return [w for name, w in self._weights.items() if name not in _TRAINABLE]

    def get_weights(self) -> list[np.ndarray]:
        """Copies of :attr:`weights`."""
        with self._lock:
            return [w.copy() for w in self._weights.values()]

    def set_weights(self, weights: Sequence[ArrayLike]) -> None:
        """Assign all weights at once, in :attr:`weights` order. Each value has the
        weight's shape or one equal to it once size-1 dims are dropped (tf.keras 2's
        broadcast shapes). A wrong count or shape raises and changes nothing."""
        weights = list(weights)
        names = list(self._weights)
        if len(weights) != len(names):
            raise ValueError(
                f"set_weights received {len(weights)} arrays; layer {self.name!r} expects "
                f"{len(names)} ({', '.join(names) or 'none: it is not built'})"
            )
        values = zip(names, weights, strict=True)
        self._assign({name: self._as_weight(value, name) for name, value in values})

    @property
    def losses(self) -> list[float]:
        """One penalty per regularized trainable weight, gamma first (R9.1)."""
        if not self._trainable:
            return []
        regularizers = (("gamma", self.gamma_regularizer), ("beta", self.beta_regularizer))
        with self._lock:
            return [
                float(regularizer(self._weights[name]))
                for name, regularizer in regularizers
                if regularizer is not None and name in self._weights
            ]

    def apply_constraints(self) -> None:
        """Project gamma and beta with their constraints (R9.2); all or nothing."""
        constraints = (("gamma", self.gamma_constraint), ("beta", self.beta_constraint))
        with self._lock:
            projected = {
                name: self._as_weight(constraint(self._weights[name].copy()), name)
                for name, constraint in constraints
                if constraint is not None and name in self._weights
            }
            self._assign(projected)

    def _as_weight(self, value: ArrayLike, name: str) -> np.ndarray:
        """``value`` checked against the channel shape, as C values in the variable dtype."""
        return as_param(value, self._channel_shape, name, dtype=self._policy.variable_dtype)

    def _assign(self, values: Mapping[str, np.ndarray]) -> None:
        """Write already validated per-channel values into the weights, in place."""
        with self._lock:
            for name, value in values.items():
                target = self._weights[name]
                target[...] = value.reshape(target.shape)  # casts like copyto(..., "unsafe")

    def _snapshot(self, names: Sequence[str]) -> dict[str, np.ndarray | None]:
        """Float64 copies of the named weights (None when absent), taken atomically."""
        with self._lock:
            return {
                name: None
                if name not in self._weights
                else np.array(self._weights[name], dtype=np.float64).reshape(-1)
                for name in names
            }

    # ------------------------------------------------------------------ build (R2)

    def build(self, input_shape: Sequence[int | None]) -> None:
        """Create the weights for inputs of ``input_shape`` (None allowed on the
        reduced axes). Building an already built layer only checks the shape."""
        shape = self._shape_tuple(input_shape)
        axes = normalize_axes(self.axis, len(shape))
        cshape = channel_shape(shape, axes) if None not in (shape[a] for a in axes) else None
        if cshape is None:
            raise ValueError(
                f"input_shape {shape} leaves a normalized axis (axis={self.axis!r}) undefined; "
                "its size is needed to create the weights"
            )
        if self.virtual_batch_size is not None and 0 in axes:
            raise ValueError(  # R1.5: ghost batches split axis 0
                f"axis={self.axis!r} normalizes axis 0, which virtual_batch_size="
                f"{self.virtual_batch_size} splits into ghost batches; choose other axes"
            )
        with self._lock:
            if self.built:
                self._check_input_shape(shape)
                return
            self._weights = self._initial_weights(cshape)
            self._axes, self._input_rank, self._channel_shape = axes, len(shape), cshape
            self.built = True

    @staticmethod
    def _shape_tuple(input_shape) -> tuple[int | None, ...]:
        try:
            dims = tuple(input_shape)
        except TypeError:
            raise TypeError(
                f"input_shape must be a sequence of ints; received {input_shape!r}"
            ) from None
        if not all(d is None or (is_integer(d) and d >= 0) for d in dims):
            raise ValueError(
                f"input_shape must hold non-negative ints or None; received {input_shape!r}"
            )
        return tuple(None if d is None else int(d) for d in dims)

    def _initial_weights(self, cshape: tuple[int, ...]) -> dict[str, np.ndarray]:
        dtype = self._policy.variable_dtype

        def initial(initializer: Callable, name: str) -> np.ndarray:
            value = initializer(cshape, dtype.name)
            return (
                as_param(value, cshape, f"{name}_initializer output", dtype=dtype)
                .reshape(cshape)
                .copy()
            )

        weights = {}
        if self.scale:
            weights["gamma"] = initial(self.gamma_initializer, "gamma")
        if self.center:
            weights["beta"] = initial(self.beta_initializer, "beta")
        weights["moving_mean"] = initial(self.moving_mean_initializer, "moving_mean")
        weights["moving_variance"] = initial(self.moving_variance_initializer, "moving_variance")
        if self.renorm:
            # R11: the stddevs start at √(variance initializer), renorm_mean at the mean one.
            stddev = np.sqrt(weights["moving_variance"].astype(np.float64)).astype(dtype)
            weights["moving_stddev"] = stddev
            weights["renorm_mean"] = weights["moving_mean"].copy()
            weights["renorm_stddev"] = stddev.copy()
        return weights

    @property
    def _channels(self) -> int:
        """C, the number of channels of the built layer (R2.2)."""
        return math.prod(self._channel_shape)

    def _check_input_shape(self, shape: Sequence[int | None]) -> None:
        """R2.3: the built rank and the sizes of the normalized axes."""
        expected = self._channel_shape
        if len(shape) != self._input_rank or channel_shape(shape, self._axes) != expected:
            raise ValueError(
                f"layer {self.name!r} was built for inputs of rank {self._input_rank} with "
                f"sizes {expected} on axes {self._axes}; received an input of shape "
                f"{tuple(shape)}"
            )

    def compute_output_shape(self, input_shape: Sequence[int | None]) -> Sequence[int | None]:
        """The output shape equals the input shape (the axes are checked against its rank)."""
        normalize_axes(self.axis, len(input_shape))
        return input_shape

    # ------------------------------------------------------------------ call (R3–R8, R11–R13)

    def __call__(self, inputs: ArrayLike, training: bool | None = None, mask=None) -> np.ndarray:
        """Normalize ``inputs``; batch statistics iff ``training`` and ``trainable`` (R3.1).

        ``mask`` (training only; its shape is always checked) selects the positions
        the statistics use: the input's shape without its last axis, or a shape of
        the input's rank that broadcasts to it (R8). Every argument is validated
        before anything changes, and a call that raises changes nothing (R5.2).
        """
        if mask is None:
            y = self._small_call(inputs, bool(training and self._trainable))
            if y is not None:
                return y
        x = self._autocast(inputs)
        if self.built:
            self._check_input_shape(x.shape)
        mask_array = canonical_mask(mask, x.shape)
        if not self.built:
            self.build(x.shape)
        y = np.empty_like(x)
        if training and self._trainable:
            record = self._forward_training(x, y, mask_array)
            self._commit_moving_update(record.batch_mean, record.batch_variance)
        else:
            record = self._forward_inference(x, y)
        self._last_call = record
        return y

    def _small_call(self, inputs: Any, training: bool) -> np.ndarray | None:
        """The common small call (plain batch normalization, no mask) in one core call
        plus, in training, the moving updates; or None when the call is anything else
        (the general path then validates and explains)."""
        w = self._weights
        if not (self.built and type(inputs) is np.ndarray and len(self._axes) == 1
                and inputs.ndim == self._input_rank
                and inputs.dtype == self._policy.compute_dtype and inputs.size < 32768):
            return None
        if training and (self.renorm or self.adjustment is not None or self.synchronized
                         or self.virtual_batch_size is not None):
            return None
        # Under the lock the weights cannot change halfway (R5.1's commits take it).
        with self._lock:
            if training:
                fast = _core.train_fast(inputs, w.get("gamma"), w.get("beta"), self._axes[0],
                                        self.epsilon, keep_params=True)
            else:
                fast = _core.normalize_fast(inputs, w["moving_mean"], w["moving_variance"],
                                            w.get("gamma"), w.get("beta"), self._axes[0],
                                            self.epsilon, keep_params=True)
        if fast is None:
            return None
        if training:
            y, (gamma, _, mean, variance) = fast
            self._commit_moving_update(mean, variance)
        else:
            y, (mean, variance, gamma, _) = fast
        view = _KernelView(inputs, y, None, self._axes, 1, None)
        self._last_call = _ForwardRecord(view, training, None, mean, variance, mean, variance,
                                         gamma if "gamma" in w else None, None, None, None, None)
        return y

    def backward(self, dy: ArrayLike) -> np.ndarray:
        """Gradient with respect to the input of the last call, for the output
        gradient ``dy`` (R15); also sets :attr:`gradients` (dγ, dβ as present in
        :attr:`trainable_weights`, in the weights' dtype).

        After a training call the derivative goes through the batch statistics
        (with a mask, the masked ones, which masked positions still depend on; with
        ``virtual_batch_size``, each ghost batch's); after an inference call the
        moving statistics are constants. Renorm's r, d and the adjustment's values
        are constants. The input of that call is kept by reference: do not modify
        it before ``backward``. Returns ``dx`` in the output's dtype.
        """
        record = self._last_call
        if record is None:
            raise ValueError(
                f"layer {self.name!r} has no call to differentiate: call it on an input "
                "before backward"
            )
        view = record.view
        shape = view.y.shape if view.virtual_batch_size is None else (
            (view.y.shape[0] * view.y.shape[1],) + view.y.shape[2:])
        grad = as_array(dy, "dy")
        if grad.shape != shape:
            raise ValueError(
                f"dy has shape {grad.shape}; expected the shape of the last call's output {shape}"
            )
        if grad.dtype != view.x.dtype:
            grad = grad.astype(view.x.dtype)
        dx = np.empty(shape, view.x.dtype)
        if view.virtual_batch_size is not None:
            grad_k, dx_k = (_ghost_view(a, view.virtual_batch_size) for a in (grad, dx))
        else:
            grad_k, dx_k = grad, dx
        ones, zeros = np.ones(self._channels), np.zeros(self._channels)
        r, d, adjust_scale, adjust_bias = (
            default if value is None else value
            for value, default in ((record.r, ones), (record.d, zeros),
                                   (record.adjust_scale, ones), (record.adjust_bias, zeros))
        )
        gamma = ones if record.gamma is None else record.gamma
        gamma_r, gamma_one = r * adjust_scale, d * adjust_scale
        dx_scale = np.tile(gamma * gamma_r, view.ghosts)
        core_args = (view.axes, view.mask, record.mean, record.variance)
        if record.allreduce is None:
            sum_dy, sum_dy_xhat = _core.backward(
                grad_k, view.x, dx_k, *core_args, dx_scale, self.epsilon, record.through_stats
            )
        else:
            # R14.3: one collective of (count, Σdy, Σdy·x̂); dγ and dβ stay this rank's.
            local = _core.backward_sums(grad_k, view.x, *core_args, self.epsilon)
            total = sum_across_ranks(record.allreduce, local.copy())
            _core.backward_apply(grad_k, view.x, dx_k, *core_args, dx_scale, self.epsilon, total)
            sum_dy, sum_dy_xhat = np.split(local, 3)[1:]
        # ∂y/∂γ = (x̂·r + d)·a_scale + a_bias; each ghost batch adds its sums.
        per_channel = (view.ghosts, self._channels)  # -1 cannot be inferred when C = 0
        sum_dy = sum_dy.reshape(per_channel).sum(axis=0)
        sum_dy_xhat = sum_dy_xhat.reshape(per_channel).sum(axis=0)
        per_weight = {
            "gamma": gamma_r * sum_dy_xhat + (gamma_one + adjust_bias) * sum_dy,
            "beta": sum_dy,
        }
        dtype = self._policy.variable_dtype
        self.gradients = [
            per_weight[name].astype(dtype).reshape(self._channel_shape)
            for name, _ in self._trainable_items()
        ]
        return dx

    def _autocast(self, inputs: ArrayLike) -> np.ndarray:
        """R7.1/R7.2: integers and bool read as float32, then everything cast to
        the compute dtype (a no-op, without a copy, when it already is)."""
        x = as_array(inputs, "inputs")
        if x.ndim == 0:
            raise ValueError("inputs must have at least one dimension; received a scalar")
        if x.dtype.kind in "iub":
            x = x.astype(np.float32)
        compute = self._policy.compute_dtype
        return x if x.dtype == compute else x.astype(compute)

    def _forward_inference(self, x: np.ndarray, y: np.ndarray) -> _ForwardRecord:
        p = self._snapshot(("moving_mean", "moving_variance", "gamma", "beta"))
        mean, variance = p["moving_mean"], p["moving_variance"]
        _core.normalize(x, y, self._axes, mean, variance, p["gamma"], p["beta"], self.epsilon)
        view = _KernelView(x, y, None, self._axes, 1, None)
        return _ForwardRecord(view, False, None, mean, variance, mean, variance, p["gamma"], None,
                              None, None, None)

    def _forward_training(
        self, x: np.ndarray, y: np.ndarray, mask: np.ndarray | None
    ) -> _ForwardRecord:
        """Normalize ``x`` into ``y`` with the batch statistics (R4, R6, R8, R11–R13).

        Every check that can fail (ghost batch divisibility, the adjustment's values)
        runs before the core writes ``y``; nothing is committed here.
        """
        # R14.1: a missing callback is an error before anything runs.
        allreduce = resolve_allreduce(self.allreduce) if self.synchronized else None
        view = self._kernel_view(x, y, mask)
        adjust_scale, adjust_bias = self._adjustment_values(x.shape)
        p = self._snapshot(
            ("gamma", "beta", "renorm_mean", "renorm_stddev", "moving_mean"))
        # Statistics before the normalize pass when the affine depends on them
        # (renorm) or they come from all ranks (R14); else one fused core call.
        statistics_first = self.renorm or allreduce is not None
        if allreduce is not None:
            # One collective of the shifted sums around the moving mean (distributed.md).
            shift_k = p["moving_mean"]
            partial = _core.moments_partial(view.x, view.axes, view.mask, shift_k)
            mean, variance = _core.moments_finalize(sum_across_ranks(allreduce, partial), shift_k)
        elif statistics_first:
            mean, variance, _ = _core.moments(view.x, view.axes, view.mask)
        if statistics_first:
            batch_mean, batch_variance = self._ghost_averages(mean, variance, view.ghosts)
        r = d = None
        if self.renorm:
            r, d = self._renorm_correction(batch_mean, batch_variance, p)
        if r is None and adjust_scale is None:
            scale, shift = p["gamma"], p["beta"]  # plain batch normalization
        else:
            ones, zeros = np.ones(self._channels), np.zeros(self._channels)
            scale, shift = _training_affine(*(
                default if value is None else value
                for value, default in ((p["gamma"], ones), (p["beta"], zeros), (r, ones),
                                       (d, zeros), (adjust_scale, ones), (adjust_bias, zeros))
            ))
        if view.ghosts != 1:  # every ghost batch gets the same per-channel affine
            scale, shift = (None if v is None else np.tile(v, view.ghosts) for v in (scale, shift))
        if statistics_first:
            _core.normalize(view.x, view.y, view.axes, mean, variance, scale, shift, self.epsilon)
        else:
            mean, variance = _core.train_forward(
                view.x, view.y, view.axes, view.mask, scale, shift, self.epsilon
            )
            batch_mean, batch_variance = self._ghost_averages(mean, variance, view.ghosts)
        return _ForwardRecord(
            view, True, allreduce, mean, variance, batch_mean, batch_variance, p["gamma"], r, d,
            adjust_scale, adjust_bias,
        )

    def _ghost_averages(
        self, mean: np.ndarray, variance: np.ndarray, ghosts: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """R12: per channel, the averages over the ghost batches of their means and of
        their variances (given per (ghost, channel)). An empty batch has no ghost batch;
        like a channel without a used position (R8.3) its statistics are then 0."""
        if ghosts == 1:
            return mean, variance
        def average(values: np.ndarray) -> np.ndarray:
            return values.reshape(ghosts, self._channels).sum(axis=0) / max(ghosts, 1)

        return average(mean), average(variance)

    def _kernel_view(
        self, x: np.ndarray, y: np.ndarray, mask: np.ndarray | None
    ) -> _KernelView:
        """The call's arrays as the core sees them: R12's ghost views with
        ``virtual_batch_size`` (a batch it does not divide raises ``ValueError``)."""
        size = self.virtual_batch_size
        if size is None:
            return _KernelView(x, y, mask, self._axes, 1, None)
        if x.shape[0] % size:
            raise ValueError(
                f"virtual_batch_size={size} must divide the batch size in training; received "
                f"inputs of shape {x.shape} (batch size {x.shape[0]})"
            )
        return _KernelView(
            _ghost_view(x, size),
            _ghost_view(y, size),
            None if mask is None else _ghost_view(mask, size),
            (1,) + tuple(axis + 1 for axis in self._axes),
            x.shape[0] // size,
            size,
        )

    def _adjustment_values(
        self, input_shape: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
        """R13: ``adjustment(input_shape)`` as per-channel float64 ``(a_scale, a_bias)``;
        ``(None, None)`` without an adjustment. Each returned value is a scalar or one value
        per channel (the channel shape, optionally with extra size-1 dims)."""
        if self.adjustment is None:
            return None, None
        pair = self.adjustment(tuple(input_shape))
        if isinstance(pair, (tuple, list)) and len(pair) == 2:
            return (
                self._per_channel_adjustment(pair[0], "scale"),
                self._per_channel_adjustment(pair[1], "bias"),
            )
        received = (
            f"a {type(pair).__name__} of length {len(pair)}"
            if isinstance(pair, (tuple, list))
            else f"an object of type {type(pair).__name__}"
        )
        raise TypeError(f"adjustment(shape) must return a pair (scale, bias); received {received}")

    def _per_channel_adjustment(self, value: Any, role: str) -> np.ndarray:
        name = f"the {role} returned by adjustment (a scalar or one value per channel)"
        arr = as_array(value, name)
        if arr.size == 1:  # one value for every channel
            arr = np.broadcast_to(arr.reshape(()), self._channel_shape)
        return as_param(arr, self._channel_shape, name)

    def _renorm_correction(
        self, mean: np.ndarray, variance: np.ndarray, p: Mapping[str, np.ndarray | None]
    ) -> tuple[np.ndarray, np.ndarray]:
        """R11's ``r`` and ``d`` from the pre-update renorm statistics."""
        stddev = np.sqrt(variance + self.epsilon)
        renorm_stddev = np.maximum(p["renorm_stddev"], np.sqrt(self.epsilon))
        r = stddev / renorm_stddev
        d = (mean - p["renorm_mean"]) / renorm_stddev
        rmax, rmin, dmax = (self.renorm_clipping.get(key) for key in _CLIPPING_KEYS)
        if rmin is not None:
            r = np.maximum(r, rmin)
        if rmax is not None:
            r = np.minimum(r, rmax)
        if dmax is not None:
            d = np.clip(d, -dmax, dmax)
        return r, d

    def _commit_moving_update(self, mean: np.ndarray, variance: np.ndarray) -> None:
        """R5.1/R11 moving updates, all computed before any is written.

        Each update is applied to the current values under the lock, so concurrent
        training calls compose like sequential ones.
        """
        momentum = self.momentum
        with self._lock:
            current = self._weights
            new = {"moving_mean": _ema(current["moving_mean"], mean, momentum)}
            if self.renorm:
                stddev = np.sqrt(variance + self.epsilon)
                moving_stddev = _ema(current["moving_stddev"], stddev, momentum)
                renorm_momentum = self.renorm_momentum
                new["moving_stddev"] = moving_stddev
                new["moving_variance"] = np.maximum(moving_stddev**2 - self.epsilon, 0.0)
                new["renorm_mean"] = _ema(current["renorm_mean"], mean, renorm_momentum)
                new["renorm_stddev"] = _ema(current["renorm_stddev"], stddev, renorm_momentum)
            else:
                new["moving_variance"] = _ema(current["moving_variance"], variance, momentum)
            self._assign(new)

    # ------------------------------------------------------------------ serialization (R10)

    def get_config(self) -> dict[str, Any]:
        """Keras' config: ``from_config(get_config())`` rebuilds an equal layer."""
        config = {
            "name": self.name,
            "trainable": self._trainable,
            "dtype": serialize_policy(self._policy),
            "axis": list(self.axis) if isinstance(self.axis, list) else self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": INITIALIZERS.serialize(self.beta_initializer),
            "gamma_initializer": INITIALIZERS.serialize(self.gamma_initializer),
            "moving_mean_initializer": INITIALIZERS.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": INITIALIZERS.serialize(self.moving_variance_initializer),
            "beta_regularizer": REGULARIZERS.serialize(self.beta_regularizer),
            "gamma_regularizer": REGULARIZERS.serialize(self.gamma_regularizer),
            "beta_constraint": CONSTRAINTS.serialize(self.beta_constraint),
            "gamma_constraint": CONSTRAINTS.serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
            "renorm": self.renorm,
            "renorm_clipping": (
                dict(self.renorm_clipping)
                if isinstance(self.renorm_clipping, Mapping)
                else self.renorm_clipping
            ),
            "renorm_momentum": self.renorm_momentum,
        }
        if self.virtual_batch_size is not None:
            config["virtual_batch_size"] = self.virtual_batch_size
        return config

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BatchNormalization:
        """A layer from :meth:`get_config`'s output, from Keras 3's or tf.keras 2's
        ``BatchNormalization.get_config()``, or from a whole serialized layer
        (``{"class_name": "BatchNormalization", "config": {...}, ...}``)."""
        check_config_mapping(config, cls.__name__)
        if "class_name" in config and isinstance(config.get("config"), Mapping):
            config = config["config"]
        kwargs = {k: v for k, v in config.items() if k not in _SHAPE_HINT_KEYS}
        if kwargs.pop("activity_regularizer", None) is not None:
            raise ValueError("activity_regularizer is not supported by cbn.BatchNormalization")
        if _is_built_tf_keras2_ghost_config(kwargs):
            kwargs["axis"] = [axis - 1 for axis in kwargs["axis"]]
        return construct_from_config(cls, kwargs)

    # A lock cannot be copied or pickled: each copy gets its own.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        state["_last_call"] = None  # it references the last input: not state
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
