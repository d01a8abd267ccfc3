"""The constructor arguments of ``cbn.BatchNormalization``, checked and kept as its
attributes.

``LayerOptions`` is the layer's base class. The constructor calls its ``_set_*``
methods in the order of its own arguments, so with several bad arguments the first one
is reported; every check raises a ``TypeError`` or ``ValueError`` naming the bad value.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ._keras_objects import CONSTRAINTS, INITIALIZERS, REGULARIZERS, real_number
from ._renorm import check_renorm_clipping
from ._validate import is_integer
from .distributed import Allreduce

__all__ = [
    "LayerOptions",
    "check_adjustment",
    "check_bool",
    "check_ghost_batch_options",
    "check_virtual_batch_size",
    "layer_name",
]

_names_lock = threading.Lock()
_name_counts: dict[str, int] = {}


def _unique_name(cls: type) -> str:
    """Keras' automatic names: ``batch_normalization``, ``batch_normalization_1``, ..."""
    prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__).lower()
    with _names_lock:
        count = _name_counts.get(prefix, 0)
        _name_counts[prefix] = count + 1
    return prefix if count == 0 else f"{prefix}_{count}"


def layer_name(name: object, cls: type) -> str:
    """``name`` (a str), or for None the next automatic name of a ``cls`` layer."""
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str or None; received {name!r}")
    return name if name is not None else _unique_name(cls)


def check_bool(value: object, name: str, error: type[Exception] = TypeError) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise error(f"{name} must be a bool; received {value!r} of type {type(value).__name__}")
    return bool(value)


def check_adjustment(
    adjustment: Callable[[tuple[int, ...]], Any] | None,
) -> Callable[[tuple[int, ...]], Any] | None:
    """tf.keras 2's ``adjustment``: a callable or None."""
    if adjustment is not None and not callable(adjustment):
        raise TypeError(
            "adjustment must be a callable adjustment(shape) -> (scale, bias) or None; "
            f"received {adjustment!r}"
        )
    return adjustment


def check_virtual_batch_size(virtual_batch_size: Any) -> int | None:
    """tf.keras 2's ``virtual_batch_size``: a positive int or None."""
    if virtual_batch_size is not None and not (
        is_integer(virtual_batch_size) and virtual_batch_size > 0
    ):
        raise ValueError(
            f"virtual_batch_size must be a positive int; received {virtual_batch_size!r}"
        )
    return None if virtual_batch_size is None else int(virtual_batch_size)


def check_ghost_batch_options(
    virtual_batch_size: int | None, adjustment: Any, synchronized: bool
) -> None:
    """Ghost batches combine with neither ``adjustment`` nor ``synchronized``."""
    if virtual_batch_size is not None and adjustment is not None:
        raise ValueError(
            "virtual_batch_size and adjustment cannot be combined; "
            f"received virtual_batch_size={virtual_batch_size!r} and adjustment={adjustment!r}"
        )
    if virtual_batch_size is not None and synchronized:
        raise ValueError(
            "synchronized=True cannot be combined with virtual_batch_size="
            f"{virtual_batch_size!r}"
        )


class LayerOptions:
    """The checked constructor arguments of ``cbn.BatchNormalization`` (its base class)."""

    def _set_weight_options(
        self,
        center: bool,
        scale: bool,
        beta_initializer: Any,
        gamma_initializer: Any,
        moving_mean_initializer: Any,
        moving_variance_initializer: Any,
        beta_regularizer: Any,
        gamma_regularizer: Any,
        beta_constraint: Any,
        gamma_constraint: Any,
    ) -> None:
        """Which of gamma and beta exist, and the Keras objects that create, penalize
        and project the weights (names, Keras config dicts or callables)."""
        self.center = check_bool(center, "center")
        self.scale = check_bool(scale, "scale")
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

    def _set_training_options(
        self,
        synchronized: bool,
        renorm: bool,
        renorm_clipping: Mapping[str, float] | None,
        renorm_momentum: float,
        fused: bool | None,
        virtual_batch_size: int | None,
        adjustment: Callable[[tuple[int, ...]], Any] | None,
        allreduce: Allreduce | None,
    ) -> None:
        """The options of the training computation: synchronized statistics, batch
        renormalization, ghost batches, the adjustment (and the ignored ``fused``)."""
        self.synchronized = check_bool(synchronized, "synchronized")
        self.renorm = check_bool(renorm, "renorm")
        # Like Keras, the clipping is only validated (and None made {}) with renorm.
        if self.renorm:
            self.renorm_clipping = check_renorm_clipping(renorm_clipping)
        else:
            self.renorm_clipping = renorm_clipping  # type: ignore[assignment]  # as given
        self.renorm_momentum = real_number(renorm_momentum, "renorm_momentum")
        # every cbn path is the fused kernel, so unlike tf.keras 2 no combination
        # of fused=True with other arguments or input ranks is refused.
        if fused is not None and not isinstance(fused, (bool, np.bool_)):
            raise TypeError(f"fused must be None, True or False; received {fused!r}")
        self.fused = None if fused is None else bool(fused)
        self.virtual_batch_size = check_virtual_batch_size(virtual_batch_size)
        self.adjustment = check_adjustment(adjustment)
        if allreduce is not None and not callable(allreduce):
            raise TypeError(f"allreduce must be a callable or None; received {allreduce!r}")
        self.allreduce = allreduce

    def _check_ghost_batch_options(self) -> None:
        check_ghost_batch_options(self.virtual_batch_size, self.adjustment, self.synchronized)
