"""Serialization of ``cbn.BatchNormalization``: the config it writes (Keras 3's format)
and the constructor arguments it reads from Keras 3, tf.keras 2 and cbn configs.

See "Configs" in ``docs/behaviour.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._keras_objects import CONSTRAINTS, INITIALIZERS, REGULARIZERS, serialize_policy
from ._validate import is_integer

__all__ = ["layer_config", "constructor_kwargs"]

# Base-layer keys Keras and tf.keras may write that carry no state of this layer
# (shape hints for the input layer of a Sequential model).
_SHAPE_HINT_KEYS = ("batch_input_shape", "batch_shape", "input_shape", "input_dim")


def layer_config(layer: Any) -> dict[str, Any]:
    """``layer.get_config()``: Keras 3's keys, plus ``virtual_batch_size`` when set."""
    config = {
        "name": layer.name,
        "trainable": layer._trainable,
        "dtype": serialize_policy(layer._policy),
        "axis": list(layer.axis) if isinstance(layer.axis, list) else layer.axis,
        "momentum": layer.momentum,
        "epsilon": layer.epsilon,
        "center": layer.center,
        "scale": layer.scale,
        "beta_initializer": INITIALIZERS.serialize(layer.beta_initializer),
        "gamma_initializer": INITIALIZERS.serialize(layer.gamma_initializer),
        "moving_mean_initializer": INITIALIZERS.serialize(layer.moving_mean_initializer),
        "moving_variance_initializer": INITIALIZERS.serialize(layer.moving_variance_initializer),
        "beta_regularizer": REGULARIZERS.serialize(layer.beta_regularizer),
        "gamma_regularizer": REGULARIZERS.serialize(layer.gamma_regularizer),
        "beta_constraint": CONSTRAINTS.serialize(layer.beta_constraint),
        "gamma_constraint": CONSTRAINTS.serialize(layer.gamma_constraint),
        "synchronized": layer.synchronized,
        "renorm": layer.renorm,
        "renorm_clipping": (
            dict(layer.renorm_clipping)
            if isinstance(layer.renorm_clipping, Mapping)
            else layer.renorm_clipping
        ),
        "renorm_momentum": layer.renorm_momentum,
    }
    if layer.virtual_batch_size is not None:
        config["virtual_batch_size"] = layer.virtual_batch_size
    return config


def constructor_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The constructor arguments in a config (a layer's, or a whole serialized layer
    ``{"class_name": ..., "config": {...}}``): shape hints dropped, tf.keras 2's shifted
    ghost-batch axes shifted back."""
    if "class_name" in config and isinstance(config.get("config"), Mapping):
        config = config["config"]
    kwargs = {k: v for k, v in config.items() if k not in _SHAPE_HINT_KEYS}
    if kwargs.pop("activity_regularizer", None) is not None:
        raise ValueError("activity_regularizer is not supported by cbn.BatchNormalization")
    if _is_built_tf_keras2_ghost_config(kwargs):
        kwargs["axis"] = [axis - 1 for axis in kwargs["axis"]]
    return kwargs


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
