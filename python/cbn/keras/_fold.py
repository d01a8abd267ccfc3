"""``cbn.keras.fold``: batch normalizations merged into the Dense or Conv layer before
them, for inference."""

from __future__ import annotations

import keras
import numpy as np

from .. import ops
from ._layer import BatchNormalization

__all__ = ["fold", "fold_weights", "Folded"]

_LINEAR = (keras.layers.Dense, keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
_NORMS = (keras.layers.BatchNormalization, BatchNormalization)


@keras.saving.register_keras_serializable(package="cbn")
class Folded(keras.layers.Layer):
    """Where :func:`fold` took a batch normalization out: passes its input (and mask) on.
    It takes the arguments a batch normalization is called with (``training``, ``mask``),
    so the model's graph is unchanged around it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs, training=None, mask=None):
        return inputs

    def compute_output_shape(self, input_shape):
        return input_shape


def _only_input_layer(layer):
    """The layer whose output is ``layer``'s one input (``layer`` called once), or None."""
    if len(layer._inbound_nodes) != 1:
        return None
    tensors = layer._inbound_nodes[0].arguments.keras_tensors
    return tensors[0]._keras_history.operation if len(tensors) == 1 else None


def _output_channel_axis(layer) -> int:
    """The channel axis of a Dense or Conv layer's output, counted from the front."""
    rank = len(layer.output.shape)
    channels_first = getattr(layer, "data_format", "channels_last") == "channels_first"
    return 1 if channels_first else rank - 1


def _folds_into(norm):
    """The Dense/Conv layer ``norm`` can be merged into, or None: it must feed ``norm``
    alone, without an activation, and ``norm`` must normalize its channel axis."""
    linear = _only_input_layer(norm)
    if (not isinstance(linear, _LINEAR) or len(linear._inbound_nodes) != 1
            or len(linear._outbound_nodes) != 1
            or linear.get_config().get("activation") != "linear"):
        return None
    rank = len(linear.output.shape)
    axes = norm.axis if isinstance(norm.axis, (list, tuple)) else [norm.axis]
    return linear if [a % rank for a in axes] == [_output_channel_axis(linear)] else None


def fold_weights(layer, norm) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, bias) of the Dense/Conv ``layer`` with the batch normalization ``norm``
    that follows it merged in (its moving statistics: inference)."""
    def value(variable):
        return keras.ops.convert_to_numpy(variable)

    return ops.fold(
        value(layer.kernel), value(layer.bias) if layer.use_bias else None,
        value(norm.moving_mean), value(norm.moving_variance),
        gamma=value(norm.gamma) if norm.scale else None,
        beta=value(norm.beta) if norm.center else None, epsilon=norm.epsilon, axis=-1)


def fold(model):
    """A clone of the Sequential or functional ``model`` in which every batch
    normalization (Keras' or cbn's) that directly follows a ``Dense`` or ``Conv1D/2D/3D``
    layer without activation, fed by it alone, is merged into that layer (which gains a
    bias if it had none) and replaced by ``keras.layers.Identity``; for inference. Other
    layers, and models nested inside ``model``, are cloned with their weights unchanged.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(f"fold expects a keras.Model; received {type(model).__name__}")
    merged_into = {norm.name: linear for norm in model.layers if isinstance(norm, _NORMS)
                   and (linear := _folds_into(norm)) is not None}
    new_weights = {linear.name: fold_weights(linear, model.get_layer(norm_name))
                   for norm_name, linear in merged_into.items()}

    def clone_layer(layer):
        if layer.name in merged_into:
            return Folded(name=layer.name)
        config = layer.get_config()
        if layer.name in new_weights:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    try:
        clone = keras.models.clone_model(model, clone_function=clone_layer)
    except ValueError as err:
        raise ValueError(f"cbn.keras.fold needs a Sequential or functional model; {err}") from err
    for layer in model.layers:
        if layer.weights and layer.name not in merged_into:
            weights = new_weights.get(layer.name)
            clone.get_layer(layer.name).set_weights(
                list(weights) if weights is not None else layer.get_weights())
    return clone
