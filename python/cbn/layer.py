"""``cbn.BatchNormalization``: a Keras-compatible batch normalization layer on NumPy
arrays. Its behaviour, and where it differs from Keras 3 and tf.keras 2, is described
in ``docs/behaviour.md``.

All per-channel arithmetic (statistics, renorm corrections, moving-average updates)
is float64; weights are stored in the policy's variable dtype. The batch mean is
handed to the core in float64, never rounded to the input dtype first, which keeps
the output exact for data whose mean is large relative to its spread.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from . import _core
from ._ghost import KernelView as _KernelView
from ._ghost import check_ghost_axes, ghost_averages, kernel_view
from ._keras_objects import (
    DTypePolicy,
    check_config_mapping,
    construct_from_config,
    get_policy,
    real_number,
)
from ._layer_config import constructor_kwargs, layer_config
from ._layer_options import LayerOptions, check_bool, layer_name
from ._record import ForwardRecord as _ForwardRecord
from ._record import PlainCall as _PlainCall
from ._record import backward_through, record_of
from ._renorm import (
    adjustment_values,
    moving_updates,
    renorm_correction,
)
from ._renorm import training_affine as _training_affine
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

def _required(value: np.ndarray | None) -> np.ndarray:
    """``as_param``'s result for a value that is not None (it returns None only for None)."""
    assert value is not None
    return value


def _weight_property(name: str) -> property:
    def get(self: BatchNormalization) -> np.ndarray | None:
        return self._weights.get(name)

    return property(get, doc=f"The ``{name}`` weight (None before build or when disabled).")


class BatchNormalization(LayerOptions):
    """Batch normalization layer, compatible with ``keras.layers.BatchNormalization``.

    Training (``training=True`` and ``trainable``) normalizes with the batch
    statistics and updates the moving ones; otherwise the moving statistics are
    used. ``layer(x)`` returns a NumPy array of the input's shape in the layer's
    compute dtype. Weights are NumPy arrays updated in place, so references to
    ``layer.moving_mean`` etc. stay current. Safe to call from several threads.
    Details: ``docs/behaviour.md`` in the repository.

    Example (a training step, then inference with the moving statistics):

    >>> import numpy as np, cbn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]], dtype=np.float32)
    >>> layer = cbn.BatchNormalization(momentum=0.5, epsilon=0.0)
    >>> layer(x, training=True)
    array([[-1., -1.],
           [ 1.,  1.]], dtype=float32)
    >>> layer.moving_mean, layer.moving_variance
    (array([ 1., 10.], dtype=float32), array([ 1. , 50.5], dtype=float32))
    >>> dx = layer.backward(np.ones_like(x))  # gradient for the loss sum(y)
    >>> [g.tolist() for g in layer.gradients]  # d gamma, d beta
    [[0.0, 0.0], [2.0, 2.0]]
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
        adjustment: Callable[[tuple[int, ...]], Any] | None = None,
        allreduce: Allreduce | None = None,
        trainable: bool = True,
        name: str | None = None,
        dtype: Any = None,
    ) -> None:
        """Arguments as ``keras.layers.BatchNormalization`` plus tf.keras 2's
        ``fused``, ``virtual_batch_size`` and ``adjustment``, and ``allreduce`` (the
        callback for ``synchronized``).

        ``axis`` is an int or a list/tuple of ints; initializers, regularizers
        and constraints are names, Keras config dicts or callables;
        ``dtype`` is None, a policy name or a Keras policy config. ``fused``
        (None/True/False) is accepted and ignored: every cbn path is fused.
        ``virtual_batch_size=V`` normalizes each ghost batch of V strided samples with
        its own statistics in training. ``adjustment(shape) -> (scale, bias)``,
        called with the input's shape in training, gives a scalar or per-channel scale
        and bias applied to the normalized values before γ and β.
        """
        self.axis = check_axis_arg(axis)
        self.momentum = real_number(momentum, "momentum")
        self.epsilon = check_epsilon(epsilon)
        self._set_weight_options(center, scale, beta_initializer, gamma_initializer,
                                 moving_mean_initializer, moving_variance_initializer,
                                 beta_regularizer, gamma_regularizer, beta_constraint,
                                 gamma_constraint)
        self._set_training_options(synchronized, renorm, renorm_clipping, renorm_momentum,
                                   fused, virtual_batch_size, adjustment, allreduce)
        self._trainable = check_bool(trainable, "trainable", ValueError)
        self._policy = get_policy(dtype)
        self._check_ghost_batch_options()
        self.name = layer_name(name, type(self))
        self._init_state()

    def _init_state(self) -> None:
        """The state of an unbuilt layer that has not been called."""
        self.built = False
        self._weights: dict[str, np.ndarray] = {}
        self._axes: tuple[int, ...] = ()
        self._input_rank = 0
        self._channel_shape: tuple[int, ...] = ()
        # Guards the weights: snapshots for a call, commits of updates, build.
        self._lock = threading.RLock()
        self._last_call: _ForwardRecord | _PlainCall | None = None
        #: Gradients of the last :meth:`backward`, aligned with :attr:`trainable_weights`.
        self.gradients: list[np.ndarray] = []

    # ------------------------------------------------------------------ dtypes

    @property
    def dtype_policy(self) -> DTypePolicy:
        """The dtype policy: ``compute_dtype`` for inputs and outputs, ``variable_dtype``
        for the weights (as Keras 3's ``Layer.dtype_policy``)."""
        return self._policy

    @property
    def dtype(self) -> str:
        """The weights' dtype (as Keras 3's ``Layer.dtype``)."""
        return self._policy.variable_dtype.name

    @property
    def variable_dtype(self) -> str:
        """The weights' dtype name, e.g. ``"float32"``."""
        return self._policy.variable_dtype.name

    @property
    def compute_dtype(self) -> str:
        """The dtype inputs are cast to and outputs are returned in."""
        return self._policy.compute_dtype.name

    # ------------------------------------------------------------------ weights

    @property
    def trainable(self) -> bool:
        """When False the layer always runs in inference mode and has no trainable weights."""
        return self._trainable

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self._trainable = check_bool(value, "trainable", ValueError)

    @property
    def weights(self) -> list[np.ndarray]:
        """gamma, beta, moving_mean, moving_variance (+ renorm's), the present ones."""
        return list(self._weights.values())

    @property
    def trainable_weights(self) -> list[np.ndarray]:
        """gamma and beta (those present) while the layer is trainable, else empty; an
        optimizer updates them in place. :attr:`gradients` follows this order."""
        return [w for _, w in self._trainable_items()]

    def _trainable_items(self) -> list[tuple[str, np.ndarray]]:
        if not self._trainable:
            return []
        return [(name, w) for name, w in self._weights.items() if name in _TRAINABLE]

    @property
    def non_trainable_weights(self) -> list[np.ndarray]:
        """The moving statistics (and renorm's); every weight when not trainable."""
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
        if not self.built:
            raise ValueError(
                f"set_weights on layer {self.name!r}, which is not built yet (it has no "
                f"weights); call layer.build(input_shape) first, e.g. "
                f"layer.build((None, 32, 32, 3)), then set_weights({len(weights)} arrays)"
            )
        if len(weights) != len(names):
            raise ValueError(
                f"set_weights received {len(weights)} arrays; layer {self.name!r} expects "
                f"{len(names)} ({', '.join(names)})"
            )
        values = zip(names, weights, strict=True)
        self._assign({name: self._as_weight(value, name) for name, value in values})

    @property
    def losses(self) -> list[float]:
        """One penalty per regularized trainable weight, gamma first."""
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
        """Project gamma and beta with their constraints; all or nothing."""
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
        return _required(as_param(value, self._channel_shape, name,
                                  dtype=self._policy.variable_dtype))

    def _assign(self, values: Mapping[str, np.ndarray]) -> None:
        """Write already validated per-channel values into the weights, in place."""
        with self._lock:
            for name, value in values.items():
                target = self._weights[name]
                target[...] = value.reshape(target.shape)  # casts like copyto(..., "unsafe")

    def _snapshot(self, names: Sequence[str]) -> dict[str, Any]:
        """Float64 copies of the named weights (None when absent), taken atomically."""
        with self._lock:
            return {
                name: None
                if name not in self._weights
                else np.array(self._weights[name], dtype=np.float64).reshape(-1)
                for name in names
            }

    # ------------------------------------------------------------------ build

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
        check_ghost_axes(self.axis, axes, self.virtual_batch_size)
        with self._lock:
            if self.built:
                self._check_input_shape(shape)
                return
            self._weights = self._initial_weights(cshape)
            self._axes, self._input_rank, self._channel_shape = axes, len(shape), cshape
            self.built = True

    @staticmethod
    def _shape_tuple(input_shape: Any) -> tuple[int | None, ...]:
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

        def initial(initializer: Callable[..., Any], name: str) -> np.ndarray:
            value = initializer(cshape, dtype.name)
            return (
                _required(as_param(value, cshape, f"{name}_initializer output", dtype=dtype))
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
            # the stddevs start at √(variance initializer), renorm_mean at the mean one.
            stddev = np.sqrt(weights["moving_variance"].astype(np.float64)).astype(dtype)
            weights["moving_stddev"] = stddev
            weights["renorm_mean"] = weights["moving_mean"].copy()
            weights["renorm_stddev"] = stddev.copy()
        return weights

    @property
    def _channels(self) -> int:
        """C, the number of channels of the built layer."""
        return math.prod(self._channel_shape)

    def _check_input_shape(self, shape: Sequence[int | None]) -> None:
        """The built rank and the sizes of the normalized axes."""
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

    # ------------------------------------------------------------------ call

    def __call__(
        self, inputs: ArrayLike, training: bool | None = None, mask: ArrayLike | None = None
    ) -> np.ndarray:
        """Normalize ``inputs``; batch statistics iff ``training`` and ``trainable``.

        ``mask`` (training only; its shape is always checked) selects the positions
        the statistics use: the input's shape without its last axis, or a shape of
        the input's rank that broadcasts to it. Every argument is validated
        before anything changes, and a call that raises changes nothing.
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
                and inputs.dtype == self._policy.compute_dtype
                and inputs.size < _core.SERIAL_THRESHOLD):
            return None
        if training and (self.renorm or self.adjustment is not None or self.synchronized
                         or self.virtual_batch_size is not None):
            return None
        # Under the lock the weights cannot change halfway (the moving updates take it).
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
        self._last_call = (inputs, y, self._axes, training, mean, variance,
                           gamma if "gamma" in w else None)
        return y

    def backward(self, dy: ArrayLike) -> np.ndarray:
        """Gradient with respect to the input of the last call, for the output
        gradient ``dy``; also sets :attr:`gradients` (dγ, dβ as present in
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
        dtype = self._policy.variable_dtype
        fast = self._small_backward(record, dy, dtype)
        dx, per_weight = fast if fast is not None else backward_through(
            record_of(record), dy, self._channels, self.epsilon)
        self.gradients = [
            per_weight[name].astype(dtype).reshape(self._channel_shape)
            for name, _ in self._trainable_items()
        ]
        return dx

    def _small_backward(self, record: _ForwardRecord | _PlainCall, dy: ArrayLike,
                        dtype: np.dtype) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
        """backward_through's result for a small call's record in one core call (gradients
        in x's dtype, which must be the weights'), or None (backward_through explains)."""
        if isinstance(record, _ForwardRecord) or record[0].dtype != dtype:
            return None
        x, _, axes, through_stats, mean, variance, gamma = record
        fast = _core.backward_fast(dy, x, mean, variance, gamma, axes[0], self.epsilon,
                                   through_stats)
        if fast is None:
            return None
        dx, dgamma, dbeta = fast
        return dx, {"gamma": dgamma, "beta": dbeta}

    def _autocast(self, inputs: ArrayLike) -> np.ndarray:
        """Integers and bool read as float32, then everything cast to
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
        return _ForwardRecord.of_plain_call(
            view, through_stats=False, mean=mean, variance=variance, gamma=p["gamma"])

    def _forward_training(
        self, x: np.ndarray, y: np.ndarray, mask: np.ndarray | None
    ) -> _ForwardRecord:
        """Normalize ``x`` into ``y`` with the batch statistics.

        Every check that can fail (ghost batch divisibility, the adjustment's values)
        runs before the core writes ``y``; nothing is committed here.
        """
        # a missing callback is an error before anything runs.
        allreduce = resolve_allreduce(self.allreduce) if self.synchronized else None
        view = kernel_view(x, y, mask, self._axes, self.virtual_batch_size)
        adjust_scale, adjust_bias = adjustment_values(self.adjustment, x.shape,
                                                      self._channel_shape)
        p = self._snapshot(
            ("gamma", "beta", "renorm_mean", "renorm_stddev", "moving_mean"))
        # Statistics before the normalize pass when the affine depends on them
        # (renorm) or they come from all ranks; else one fused core call.
        statistics_first = self.renorm or allreduce is not None
        if allreduce is not None:
            # One collective of the shifted sums around the moving mean (distributed.md).
            shift_k = p["moving_mean"]
            partial = _core.moments_partial(view.x, view.axes, view.mask, shift_k)
            mean, variance = _core.moments_finalize(sum_across_ranks(allreduce, partial), shift_k)
        elif statistics_first:
            mean, variance, _ = _core.moments(view.x, view.axes, view.mask)
        if statistics_first:
            batch_mean, batch_variance = ghost_averages(
                mean, variance, view.ghosts, self._channels)
        r = d = None
        if self.renorm:
            r, d = renorm_correction(batch_mean, batch_variance, p["renorm_mean"],
                                     p["renorm_stddev"], self.epsilon, self.renorm_clipping)
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
            batch_mean, batch_variance = ghost_averages(
                mean, variance, view.ghosts, self._channels)
        return _ForwardRecord(
            view=view, through_stats=True, allreduce=allreduce, mean=mean, variance=variance,
            batch_mean=batch_mean, batch_variance=batch_variance, gamma=p["gamma"], r=r, d=d,
            adjust_scale=adjust_scale, adjust_bias=adjust_bias,
        )

    def _commit_moving_update(self, mean: np.ndarray, variance: np.ndarray) -> None:
        """The moving-statistics updates (and renorm's), all computed before any is written.

        Each update is applied to the current values under the lock, so concurrent
        training calls compose like sequential ones.
        """
        with self._lock:
            if not self.renorm and _core.moving_average_fast(
                    self._weights["moving_mean"], self._weights["moving_variance"], mean,
                    variance, self.momentum):
                return  # the common call: 1-D weights, float64 batch statistics
            self._assign(moving_updates(
                self._weights, mean, variance, momentum=self.momentum, epsilon=self.epsilon,
                renorm_momentum=self.renorm_momentum if self.renorm else None,
            ))

    # ------------------------------------------------------------------ serialization

    def get_config(self) -> dict[str, Any]:
        """Keras' config: ``from_config(get_config())`` rebuilds an equal layer."""
        return layer_config(self)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> BatchNormalization:
        """A layer from :meth:`get_config`'s output, from Keras 3's or tf.keras 2's
        ``BatchNormalization.get_config()``, or from a whole serialized layer
        (``{"class_name": "BatchNormalization", "config": {...}, ...}``)."""
        check_config_mapping(config, cls.__name__)
        return construct_from_config(cls, constructor_kwargs(config))

    # A lock cannot be copied or pickled: each copy gets its own.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_lock"]
        state["_last_call"] = None  # it references the last input: not state
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()
