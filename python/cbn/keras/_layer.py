"""``cbn.keras.BatchNormalization``: a Keras 3 layer whose batch normalization runs on
cbn's kernels (forward and exact backward) on the torch, JAX, TensorFlow and numpy
backends."""

from __future__ import annotations

import math

import keras
from keras import ops

from .._keras_objects import real_number
from .._layer_options import check_adjustment, check_bool
from .._renorm import check_renorm_clipping as _check_renorm_clipping
from .._validate import check_axis_arg, check_epsilon, normalize_axes, squeezed_shape
from ._kernels import kernels_for

__all__ = ["BatchNormalization", "convert"]


def _unsupported(argument: str, value) -> NotImplementedError:
    return NotImplementedError(
        f"cbn.keras.BatchNormalization does not support {argument}={value!r}; use "
        "keras.layers.BatchNormalization, or cbn.BatchNormalization (the NumPy layer) "
        "outside Keras models"
    )


@keras.saving.register_keras_serializable(package="cbn")
class BatchNormalization(keras.layers.Layer):
    """Batch normalization computed by cbn, a drop-in ``keras.layers.BatchNormalization``.

    Same arguments, weights (``gamma``, ``beta``, ``moving_mean``, ``moving_variance``:
    names, order, shapes, dtypes) and behaviour as Keras' layer; ``axis`` may also be a
    list of ints (statistics per element of those axes, as tf.keras 2). tf.keras 2's
    ``fused`` is accepted and ignored, its ``adjustment(shape) -> (scale, bias)`` (scalar or
    per channel, applied to the normalized values before γ and β in training) is supported;
    ``renorm``, ``virtual_batch_size`` and ``synchronized=True`` are not (they raise
    ``NotImplementedError``: use ``keras.layers.BatchNormalization``).
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
        self.axis = check_axis_arg(axis)
        self.momentum = real_number(momentum, "momentum")
        self.epsilon = check_epsilon(epsilon)
        self.center = check_bool(center, "center")
        self.scale = check_bool(scale, "scale")
        self.beta_initializer = keras.initializers.get(beta_initializer)
        self.gamma_initializer = keras.initializers.get(gamma_initializer)
        self.moving_mean_initializer = keras.initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = keras.initializers.get(moving_variance_initializer)
        self.beta_regularizer = keras.regularizers.get(beta_regularizer)
        self.gamma_regularizer = keras.regularizers.get(gamma_regularizer)
        self.beta_constraint = keras.constraints.get(beta_constraint)
        self.gamma_constraint = keras.constraints.get(gamma_constraint)
        self.renorm_momentum = real_number(renorm_momentum, "renorm_momentum")
        if check_bool(synchronized, "synchronized"):
            raise _unsupported("synchronized", synchronized)
        if check_bool(renorm, "renorm"):
            _check_renorm_clipping(renorm_clipping)
            raise _unsupported("renorm", renorm)
        if fused is not None and not isinstance(fused, bool):
            raise TypeError(f"fused must be None, True or False; received {fused!r}")
        if virtual_batch_size is not None:
            raise _unsupported("virtual_batch_size", virtual_batch_size)
        self.adjustment = check_adjustment(adjustment)
        self.supports_masking = True
        self._kernels = kernels_for(keras.backend.backend())
        self._axes: tuple[int, ...] = ()

    def build(self, input_shape):
        self._axes = normalize_axes(self.axis, len(input_shape))
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
            if self.adjustment is not None:
                # y = (x̂·a_scale + a_bias)·γ + β: the kernel's affine, which autodiff differentiates
                a_scale, a_bias = self._adjustment_values(ops.shape(inputs), shape, dtype)
                gamma, beta = gamma * a_scale, gamma * a_bias + beta
            y, mean, variance = self._kernels.train(x, gamma, beta, mask, self._axes, self.epsilon)
            self._update_moving(self.moving_mean, mean)
            self._update_moving(self.moving_variance, variance)
        else:
            mean = ops.cast(self.moving_mean, dtype)
            variance = ops.cast(self.moving_variance, dtype)
            y = self._kernels.infer(x, mean, variance, gamma, beta, self._axes, self.epsilon)
        return ops.cast(y, self.compute_dtype)

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

    def _update_moving(self, variable, batch_value):
        batch_value = ops.cast(ops.stop_gradient(batch_value), variable.dtype)
        variable.assign(variable * self.momentum + batch_value * (1.0 - self.momentum))

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
            "synchronized": False,
            "renorm": False,
            "renorm_clipping": None,
            "renorm_momentum": self.renorm_momentum,
        }
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
