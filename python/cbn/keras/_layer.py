"""``cbn.keras.BatchNormalization``: a Keras 3 layer whose batch normalization runs on
cbn's kernels (forward and exact backward) on the torch, JAX, TensorFlow and numpy
backends."""

from __future__ import annotations

import math

import keras
from keras import ops

from .._ghost import check_ghost_axes
from .._keras_objects import real_number
from .._layer_options import (
    check_adjustment,
    check_bool,
    check_ghost_batch_options,
    check_virtual_batch_size,
)
from .._renorm import check_renorm_clipping, moving_updates, renorm_correction, training_affine
from .._validate import check_axis_arg, check_epsilon, normalize_axes, squeezed_shape
from ._ghost_batches import ghost_batches_train
from ._kernels import kernels_for

__all__ = ["BatchNormalization", "convert"]

_RENORM_WEIGHTS = ("moving_stddev", "renorm_mean", "renorm_stddev")


def _clone_initializer(initializer):
    """A fresh copy of a Keras initializer object (its own seed), as Keras does for the
    renorm weights; other callables as they are."""
    if isinstance(initializer, keras.initializers.Initializer):
        return initializer.__class__.from_config(initializer.get_config())
    return initializer


@keras.saving.register_keras_serializable(package="cbn")
class BatchNormalization(keras.layers.Layer):
    """Batch normalization computed by cbn, a drop-in ``keras.layers.BatchNormalization``.

    Same arguments, weights (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``,
    and with ``renorm=True`` ``moving_stddev``, ``renorm_mean``, ``renorm_stddev``: names,
    order, shapes, dtypes) and behaviour as Keras' layer, batch renormalization
    (``renorm``, ``renorm_clipping``, ``renorm_momentum``) included; ``axis`` may also be a
    list of ints (statistics per element of those axes, as tf.keras 2).

    ``synchronized=True`` works where Keras' does, on the TensorFlow backend (elsewhere a
    ``ValueError``, as Keras): inside a ``tf.distribute`` strategy the statistics are
    those of the global batch (uneven replica batches and masks included; Keras ignores
    ``synchronized`` with a mask), and the gradients go through them.

    tf.keras 2's extras: ``fused`` is accepted and ignored; ``adjustment(shape) -> (scale,
    bias)`` (scalar or per channel, applied to the normalized values before γ and β in
    training); ``virtual_batch_size=V`` (ghost batch normalization: in training each
    strided ghost batch ``{b : b mod (B/V) = g}`` is normalized with its own statistics,
    the moving statistics get their averages; ``V`` must divide the batch size).
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_mean_initializer="zeros",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        synchronized=False,
        renorm=False,
        renorm_clipping=None,
        renorm_momentum=0.99,
        fused=None,
        virtual_batch_size=None,
        adjustment=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        try:
            self.axis = check_axis_arg(axis)
            self.momentum = real_number(momentum, "momentum")
            self.epsilon = check_epsilon(epsilon)
            self.center = check_bool(center, "center")
            self.scale = check_bool(scale, "scale")
            self.beta_initializer = keras.initializers.get(beta_initializer)
            self.gamma_initializer = keras.initializers.get(gamma_initializer)
            self.moving_mean_initializer = keras.initializers.get(moving_mean_initializer)
            self.moving_variance_initializer = keras.initializers.get(
                moving_variance_initializer)
            self.beta_regularizer = keras.regularizers.get(beta_regularizer)
            self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
            self.beta_constraint = keras.constraints.get(beta_constraint)
            self.gamma_constraint = keras.constraints.get(gamma_constraint)
            self._set_training_options(synchronized, renorm, renorm_clipping, renorm_momentum,
                                       fused, virtual_batch_size, adjustment)
        except (TypeError, ValueError) as err:
            raise type(err)(f"cbn.keras.BatchNormalization: {err}") from err
        self.supports_masking = True
        self._kernels = kernels_for(keras.backend.backend())
        self._axes: tuple[int, ...] = ()

    def _set_training_options(self, synchronized, renorm, renorm_clipping, renorm_momentum,
                              fused, virtual_batch_size, adjustment):
        self.synchronized = check_bool(synchronized, "synchronized")
        if self.synchronized and keras.backend.backend() != "tensorflow":
            raise ValueError(
                "synchronized=True is only supported with the TensorFlow backend (as "
                f"keras.layers.BatchNormalization); the backend is {keras.backend.backend()!r}"
            )
        self.renorm = check_bool(renorm, "renorm")
        # As Keras: the clipping is validated (and None made {}) only with renorm.
        self.renorm_clipping = (check_renorm_clipping(renorm_clipping) if self.renorm
                                else renorm_clipping)
        self.renorm_momentum = real_number(renorm_momentum, "renorm_momentum")
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be None, True or False; received {fused!r}")
        self.virtual_batch_size = check_virtual_batch_size(virtual_batch_size)
        self.adjustment = check_adjustment(adjustment)
        check_ghost_batch_options(self.virtual_batch_size, self.adjustment, self.synchronized)

    def build(self, input_shape):
        self._axes = normalize_axes(self.axis, len(input_shape))
        try:
            check_ghost_axes(self.axis, self._axes, self.virtual_batch_size)
        except ValueError as err:
            raise ValueError(f"cbn.keras.BatchNormalization: {err}") from None
        shape = tuple(input_shape[a] for a in self._axes)
        if any(size is None for size in shape):
            raise ValueError(
                f"cbn.keras.BatchNormalization needs the size of the channel axes {self._axes} "
                f"to be known; received input shape {tuple(input_shape)}"
            )

        def weight(name, initializer, trainable, **extra):
            return self.add_weight(shape=shape, name=name, initializer=initializer,
                                   trainable=trainable, autocast=False, **extra)

        if self.scale:
            self.gamma = weight("gamma", self.gamma_initializer, True,
                                regularizer=self.gamma_regularizer,
                                constraint=self.gamma_constraint)
        if self.center:
            self.beta = weight("beta", self.beta_initializer, True,
                               regularizer=self.beta_regularizer, constraint=self.beta_constraint)
        self.moving_mean = weight("moving_mean", self.moving_mean_initializer, False)
        self.moving_variance = weight("moving_variance", self.moving_variance_initializer, False)
        if self.renorm:
            # As Keras: the stddevs start at √(variance initializer), renorm_mean at the
            # mean one, each from its own copy of the initializer.
            def moving_stddev_initializer(shape, dtype=None):
                return ops.sqrt(_clone_initializer(self.moving_variance_initializer)(
                    shape, dtype=dtype))

            self.moving_stddev = weight("moving_stddev", moving_stddev_initializer, False)
            self.renorm_mean = weight(
                "renorm_mean", _clone_initializer(self.moving_mean_initializer), False)
            self.renorm_stddev = weight("renorm_stddev", moving_stddev_initializer, False)
        self.input_spec = keras.layers.InputSpec(
            ndim=len(input_shape), axes={a: input_shape[a] for a in self._axes}
        )

    def call(self, inputs, training=None, mask=None):
        # As Keras: half-precision inputs are normalized in float32, the result cast back.
        dtype = keras.backend.result_type(inputs.dtype, "float32")
        x = ops.cast(inputs, dtype)
        shape = tuple(ops.shape(self.moving_mean))
        gamma = ops.cast(self.gamma, dtype) if self.scale else ops.ones(shape, dtype)
        beta = ops.cast(self.beta, dtype) if self.center else ops.zeros(shape, dtype)
        if training and self.trainable:
            if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
                raise ValueError(
                    f"cbn.keras.BatchNormalization expects a mask of shape {inputs.shape[:-1]} "
                    f"(the input's without its last axis); received mask shape {mask.shape}"
                )
            if mask is not None:  # (B, ..., 1): broadcasts over the channels on every backend
                mask = ops.expand_dims(ops.cast(mask, "bool"), -1)
            y = self._train(x, gamma, beta, mask)
        else:
            mean = ops.cast(self.moving_mean, dtype)
            variance = ops.cast(self.moving_variance, dtype)
            y = self._kernels.infer(x, mean, variance, gamma, beta, self._axes, self.epsilon)
        return ops.cast(y, self.compute_dtype)

    def _train(self, x, gamma, beta, mask):
        """The training output; updates the moving statistics (and renorm's)."""
        a_scale, a_bias = (1.0, 0.0) if self.adjustment is None else self._adjustment_values(
            ops.shape(x), tuple(ops.shape(gamma)), x.dtype)
        if not self.renorm:
            # y = (x̂·a_scale + a_bias)·γ + β: the kernel's affine, which autodiff differentiates
            scale, shift = (gamma, beta) if self.adjustment is None else training_affine(
                gamma, beta, 1.0, 0.0, a_scale, a_bias)
            y, mean, variance = self._batch_normalized(x, scale, shift, mask)
            self._update_moving(mean, variance)
            return y
        # r and d need the batch statistics: the kernel gives x̂ with them, then
        # y = ((x̂·r + d)·a_scale + a_bias)·γ + β in backend ops, r and d constants (Keras).
        x_hat, mean, variance = self._batch_normalized(
            x, ops.ones_like(gamma), ops.zeros_like(beta), mask)
        current = self._current(("renorm_mean", "renorm_stddev"), mean.dtype)
        r, d = (ops.stop_gradient(ops.cast(v, x.dtype)) for v in renorm_correction(
            ops.stop_gradient(mean), ops.stop_gradient(variance), current["renorm_mean"],
            current["renorm_stddev"], self.epsilon, self.renorm_clipping, xp=ops))
        scale, shift = training_affine(gamma, beta, r, d, a_scale, a_bias)
        self._update_moving(mean, variance)
        rank = len(x.shape)
        return x_hat * self._broadcastable(scale, rank) + self._broadcastable(shift, rank)

    def _batch_normalized(self, x, gamma, beta, mask):
        """``(y, mean, variance)`` of the training kernel: per ghost batch with
        ``virtual_batch_size``, over all replicas with ``synchronized``."""
        if self.virtual_batch_size is not None:
            return ghost_batches_train(self._kernels.train, x, gamma, beta, mask, self._axes,
                                       self.epsilon, self.virtual_batch_size)
        if self.synchronized:
            from ._tf_synchronized import train_synchronized

            shift = ops.cast(self.moving_mean, "float64")
            return train_synchronized(x, gamma, beta, mask, self._axes, self.epsilon, shift)
        return self._kernels.train(x, gamma, beta, mask, self._axes, self.epsilon)

    def _broadcastable(self, per_channel, rank):
        """A channel-shaped tensor reshaped to broadcast against an input of ``rank``."""
        shape = [1] * rank
        for axis, size in zip(self._axes, ops.shape(per_channel), strict=True):
            shape[axis] = size
        return ops.reshape(per_channel, shape)

    def _adjustment_values(self, input_shape, channel_shape, dtype):
        """tf.keras 2's ``adjustment(input_shape) -> (scale, bias)``, each a scalar or one
        value per channel, as tensors of the channel shape."""
        pair = self.adjustment(input_shape)
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise TypeError(
                f"adjustment(shape) must return a pair (scale, bias); received {pair!r}"
            )
        values = []
        for role, value in zip(("scale", "bias"), pair, strict=True):
            value = ops.cast(value, dtype)
            shape = tuple(ops.shape(value))
            if math.prod(shape) == 1:
                values.append(ops.broadcast_to(ops.reshape(value, ()), channel_shape))
            elif squeezed_shape(shape) == squeezed_shape(channel_shape):
                values.append(ops.reshape(value, channel_shape))
            else:
                raise ValueError(
                    f"the {role} returned by adjustment has shape {shape}; expected a scalar "
                    f"or one value per channel (shape {channel_shape})"
                )
        return values

    def _current(self, names, dtype):
        return {name: ops.cast(getattr(self, name), dtype) for name in names}

    def _update_moving(self, mean, variance):
        """Keras' moving-average updates (with renorm, of its statistics too)."""
        mean, variance = ops.stop_gradient(mean), ops.stop_gradient(variance)
        names = ("moving_mean", "moving_variance") + (_RENORM_WEIGHTS if self.renorm else ())
        new = moving_updates(
            self._current(names, mean.dtype), mean, variance, momentum=self.momentum,
            epsilon=self.epsilon, renorm_momentum=self.renorm_momentum if self.renorm else None,
            xp=ops)
        for name, value in new.items():
            variable = getattr(self, name)
            variable.assign(ops.cast(value, variable.dtype))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        serialize = keras.saving.serialize_keras_object
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": serialize(self.beta_initializer),
            "gamma_initializer": serialize(self.gamma_initializer),
            "moving_mean_initializer": serialize(self.moving_mean_initializer),
            "moving_variance_initializer": serialize(self.moving_variance_initializer),
            "beta_regularizer": serialize(self.beta_regularizer),
            "gamma_regularizer": serialize(self.gamma_regularizer),
            "beta_constraint": serialize(self.beta_constraint),
            "gamma_constraint": serialize(self.gamma_constraint),
            "synchronized": self.synchronized,
            "renorm": self.renorm,
            "renorm_clipping": self.renorm_clipping,
            "renorm_momentum": self.renorm_momentum,
        }
        if self.virtual_batch_size is not None:  # tf.keras 2's key, absent from Keras 3
            config["virtual_batch_size"] = self.virtual_batch_size
        return {**super().get_config(), **config}


def convert(model):
    """A clone of the Sequential or functional Keras ``model`` with every
    ``keras.layers.BatchNormalization`` replaced by ``cbn.keras.BatchNormalization``
    (same config), all weights (moving statistics included) carried over."""
    if not isinstance(model, keras.Model):
        raise TypeError(f"convert expects a keras.Model; received {type(model).__name__}")

    def clone_layer(layer):
        if type(layer) is keras.layers.BatchNormalization:
            return BatchNormalization.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    try:
        clone = keras.models.clone_model(model, clone_function=clone_layer)
    except ValueError as err:
        raise ValueError(
            f"cbn.keras.convert needs a Sequential or functional model; {err}"
        ) from err
    clone.set_weights(model.get_weights())
    return clone
