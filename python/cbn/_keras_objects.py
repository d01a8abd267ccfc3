"""Keras-compatible initializers, regularizers, constraints and dtype policies.

Each kind is resolved from a name (``"zeros"``, ``"l2"``, ``"max_norm"``), a Keras
config dict (``{"class_name": "Constant", "config": {"value": 4.0}}``, with or
without Keras 3's ``module``/``registered_name`` keys), or a callable (used as
is, so Keras' own objects work). Objects serialize in Keras 3's format:
``{"module": "keras.initializers", "class_name": "Zeros", "config": {},
"registered_name": None}``. All arithmetic is NumPy on the host.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ._validate import MAX_RANK, bfloat16, is_integer, short_repr

#: Keras' ``backend.epsilon()``, used by its norm constraints.
KERAS_EPSILON = 1e-7


def real_number(value, name: str, *, minimum: float | None = None) -> float:
    """``value`` as a finite float (not a bool), optionally ``>= minimum``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; received {short_repr(value)}")
    try:
        out = float(value)
    except OverflowError:  # an int beyond float64's range
        out = float("inf")
    if not np.isfinite(out) or (minimum is not None and out < minimum):
        bound = "" if minimum is None else f" and >= {minimum}"
        raise ValueError(f"{name} must be finite{bound}; received {short_repr(value)}")
    return out



def construct_from_config(cls: type, config: Mapping[str, Any]):
    """``cls(**config)``, refusing keys its constructor does not take (naming them)."""
    check_config_mapping(config, cls.__name__)
    accepted = inspect.signature(cls).parameters
    unknown = sorted(set(config) - set(accepted), key=repr)
    if unknown:
        raise ValueError(
            f"unknown keys {short_repr(unknown)} in the config of {cls.__name__}; "
            f"expected a subset of {list(accepted)}"
        )
    return cls(**config)

def check_config_mapping(config, owner: str) -> None:
    """A config must be a mapping (a dict from ``get_config``), else ``TypeError``."""
    if not isinstance(config, Mapping):
        raise TypeError(
            f"the config of {owner} must be a dict (from get_config()); received "
            f"{short_repr(config)} of type {type(config).__name__}"
        )


class KerasObject:
    """Base of the built-in objects: Keras-style ``get_config``/``from_config``.

    Subclasses set ``module`` (Keras 3's public module) and ``aliases`` (the
    snake_case names Keras resolves to the class).
    """

    module: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()

    def get_config(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_config(cls, config: dict[str, Any]):
        return construct_from_config(cls, config)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


# ----------------------------------------------------------------------------- initializers


class Initializer(KerasObject):
    """An initializer: ``init(shape, dtype) -> ndarray``."""

    module = "keras.initializers"

    def __call__(self, shape, dtype=None) -> np.ndarray:
        values = self._values(tuple(int(s) for s in shape))
        with np.errstate(over="ignore"):
            out = np.asarray(values, dtype=np.float32 if dtype is None else dtype)
        if not np.isfinite(out).all():
            raise ValueError(
                f"{self!r} gives non-finite values in {out.dtype}; expected parameters whose "
                "draws fit the weights' dtype"
            )
        return out

    def _values(self, shape: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError


class Zeros(Initializer):
    aliases = ("zeros",)

    def _values(self, shape):
        return np.zeros(shape)


class Ones(Initializer):
    aliases = ("ones",)

    def _values(self, shape):
        return np.ones(shape)


class Constant(Initializer):
    aliases = ("constant",)

    def __init__(self, value: float = 0.0):
        self.value = real_number(value, "Constant value")

    def _values(self, shape):
        return np.full(shape, self.value)

    def get_config(self):
        return {"value": self.value}


def _seed(seed) -> int | None:
    """A seed as an int; also takes a serialized Keras ``SeedGenerator``."""
    if isinstance(seed, dict):
        config = seed.get("config", {})
        seed = config.get("seed") if isinstance(config, dict) else config
    if seed is None or (isinstance(seed, numbers.Integral) and not isinstance(seed, bool)):
        return None if seed is None else int(seed)
    raise TypeError(
        "seed must be an int, None or a serialized SeedGenerator "
        f"({{'config': {{'seed': int}}}}); received {short_repr(seed)}"
    )


class RandomInitializer(Initializer):
    """Random initializers draw from a NumPy Generator. Like Keras, an instance
    gives the same values on every call (unseeded ones pick their seed once)."""

    def __init__(self, seed=None):
        self.seed = _seed(seed)
        self._entropy = np.random.SeedSequence(self.seed).entropy

    def _generator(self) -> np.random.Generator:
        return np.random.default_rng(self._entropy)

    def get_config(self):
        return {"seed": self.seed}


class RandomNormal(RandomInitializer):
    aliases = ("random_normal",)

    def __init__(self, mean: float = 0.0, stddev: float = 0.05, seed=None):
        self.mean = real_number(mean, "mean")
        self.stddev = real_number(stddev, "stddev", minimum=0.0)
        super().__init__(seed)

    def _values(self, shape):
        return self._generator().normal(self.mean, self.stddev, shape)

    def get_config(self):
        return {**super().get_config(), "mean": self.mean, "stddev": self.stddev}


class TruncatedNormal(RandomNormal):
    """Normal samples further than two standard deviations from the mean are redrawn."""

    aliases = ("truncated_normal",)

    def _values(self, shape):
        rng = self._generator()
        z = rng.standard_normal(shape)
        outside = np.abs(z) > 2.0
        while outside.any():
            z[outside] = rng.standard_normal(int(outside.sum()))
            outside = np.abs(z) > 2.0
        return self.mean + self.stddev * z


class RandomUniform(RandomInitializer):
    aliases = ("random_uniform",)

    def __init__(self, minval: float = -0.05, maxval: float = 0.05, seed=None):
        self.minval = real_number(minval, "minval")
        self.maxval = real_number(maxval, "maxval")
        if self.maxval < self.minval:
            raise ValueError(f"maxval must be >= minval; received minval={minval}, maxval={maxval}")
        super().__init__(seed)

    def _values(self, shape):
        return self._generator().uniform(self.minval, self.maxval, shape)

    def get_config(self):
        return {**super().get_config(), "minval": self.minval, "maxval": self.maxval}


# ----------------------------------------------------------------------------- regularizers


class Regularizer(KerasObject):
    """A regularizer: ``reg(w) -> float`` (a penalty added to the loss)."""

    module = "keras.regularizers"


class L1L2(Regularizer):
    """``l1·Σ|w| + l2·Σw²``."""

    def __init__(self, l1: float = 0.0, l2: float = 0.0):
        self.l1 = real_number(l1, "l1", minimum=0.0)
        self.l2 = real_number(l2, "l2", minimum=0.0)

    def __call__(self, w) -> float:
        w = np.asarray(w, dtype=np.float64)
        return float(self.l1 * np.abs(w).sum() + self.l2 * np.square(w).sum())

    def get_config(self):
        return {"l1": self.l1, "l2": self.l2}


class L1(L1L2):
    aliases = ("l1",)

    def __init__(self, l1: float = 0.01):
        super().__init__(l1=l1)

    def get_config(self):
        return {"l1": self.l1}


class L2(L1L2):
    aliases = ("l2",)

    def __init__(self, l2: float = 0.01):
        super().__init__(l2=l2)

    def get_config(self):
        return {"l2": self.l2}


def _l1_l2() -> L1L2:
    # tf.keras 2's string "l1_l2" meant 0.01 for both (the class defaults to 0).
    return L1L2(l1=0.01, l2=0.01)


# ----------------------------------------------------------------------------- constraints


class Constraint(KerasObject):
    """A constraint: ``c(w) -> w`` (a projection applied after each update)."""

    module = "keras.constraints"


class NonNeg(Constraint):
    aliases = ("non_neg",)

    def __call__(self, w) -> np.ndarray:
        return np.maximum(np.asarray(w), 0)


class _NormConstraint(Constraint):
    """Rescales ``w`` so its L2 norms along ``axis`` become ``_target(norms)``."""

    def __init__(self, axis=0):
        if not is_integer(axis) and not (
            isinstance(axis, (list, tuple)) and 0 < len(axis) <= MAX_RANK
            and all(is_integer(a) for a in axis)
        ):
            raise TypeError(f"axis must be an int or a list of ints; received {short_repr(axis)}")
        self.axis = [int(a) for a in axis] if isinstance(axis, (list, tuple)) else int(axis)

    def __call__(self, w) -> np.ndarray:
        w = np.asarray(w, dtype=np.float64)
        axis = tuple(self.axis) if isinstance(self.axis, list) else self.axis
        norms = np.sqrt(np.square(w).sum(axis=axis, keepdims=True))
        return w * (self._target(norms) / (KERAS_EPSILON + norms))

    def _target(self, norms: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def get_config(self):
        return {"axis": self.axis}


class UnitNorm(_NormConstraint):
    aliases = ("unit_norm",)

    def _target(self, norms):
        return np.ones_like(norms)


class MaxNorm(_NormConstraint):
    aliases = ("max_norm",)

    def __init__(self, max_value: float = 2, axis=0):
        self.max_value = real_number(max_value, "max_value", minimum=0.0)
        super().__init__(axis)

    def _target(self, norms):
        return np.clip(norms, 0, self.max_value)

    def get_config(self):
        return {"max_value": self.max_value, "axis": self.axis}


class MinMaxNorm(_NormConstraint):
    aliases = ("min_max_norm",)

    def __init__(self, min_value: float = 0.0, max_value: float = 1.0, rate: float = 1.0, axis=0):
        self.min_value = real_number(min_value, "min_value", minimum=0.0)
        self.max_value = real_number(max_value, "max_value", minimum=self.min_value)
        self.rate = real_number(rate, "rate")
        super().__init__(axis)

    def _target(self, norms):
        return self.rate * np.clip(norms, self.min_value, self.max_value) + (1 - self.rate) * norms

    def get_config(self):
        return {
            "min_value": self.min_value,
            "max_value": self.max_value,
            "rate": self.rate,
            "axis": self.axis,
        }


# ----------------------------------------------------------------------------- resolution


@dataclass(frozen=True)
class _Kind:
    """One family of objects: what it is called and which classes/names it knows."""

    what: str
    module: str
    classes: tuple[type[KerasObject], ...]
    extra_names: tuple[tuple[str, Callable[[], KerasObject]], ...] = ()

    def names(self) -> dict[str, Callable[[], KerasObject]]:
        table: dict[str, Callable[[], KerasObject]] = {}
        for cls in self.classes:
            table[cls.__name__] = cls
            for alias in cls.aliases:
                table[alias] = cls
        table.update(self.extra_names)
        return table

    def get(self, identifier: Any) -> Any:
        """Resolve a name, a Keras config dict or a callable; ``None`` stays ``None``."""
        if isinstance(identifier, type):  # a class, as Keras accepts: instantiate it
            return identifier()
        if identifier is None or callable(identifier):
            return identifier
        table = self.names()
        if isinstance(identifier, str):
            if identifier not in table:
                raise ValueError(
                    f"unknown {self.what} {identifier!r}; expected one of {sorted(table)}, "
                    "a Keras config dict or a callable"
                )
            return table[identifier]()
        if isinstance(identifier, dict):
            return self._from_dict(identifier)
        raise TypeError(
            f"{self.what} must be a name, a Keras config dict or a callable; "
            f"received {short_repr(identifier)} of type {type(identifier).__name__}"
        )

    def _from_dict(self, identifier: dict) -> KerasObject:
        class_name = identifier.get("class_name")
        config = identifier.get("config") or {}
        cls = next((c for c in self.classes if c.__name__ == class_name), None)
        if cls is None or not isinstance(config, dict):
            known = [c.__name__ for c in self.classes]
            raise ValueError(
                f"cannot load the {self.what} config {short_repr(identifier)}: expected "
                f"{{'class_name': one of {known}, 'config': {{...}}}}; pass any other "
                f"{self.what} as a callable"
            )
        return cls.from_config(config)

    def serialize(self, obj) -> dict[str, Any] | None:
        """Keras 3's format. Foreign objects with ``get_config`` (Keras' own) are
        written under their class name; other callables as Keras writes functions."""
        if obj is None:
            return None
        if isinstance(obj, KerasObject):
            return _entry(obj.module, type(obj).__name__, obj.get_config())
        if hasattr(obj, "get_config"):
            module = type(obj).__module__
            # Keras' built-ins live in private modules; Keras itself writes the public one.
            if module.split(".")[0] == "keras":
                module = self.module
            return _entry(module, type(obj).__name__, obj.get_config())
        name = getattr(obj, "__name__", repr(obj))
        return _entry(getattr(obj, "__module__", None), "function", name, registered_name=name)


def _entry(module, class_name: str, config, registered_name: str | None = None) -> dict[str, Any]:
    return {
        "module": module,
        "class_name": class_name,
        "config": config,
        "registered_name": registered_name,
    }


INITIALIZERS = _Kind(
    "initializer",
    "keras.initializers",
    (Zeros, Ones, Constant, RandomNormal, RandomUniform, TruncatedNormal),
)
REGULARIZERS = _Kind(
    "regularizer", "keras.regularizers", (L1, L2, L1L2), extra_names=(("l1_l2", _l1_l2),)
)
CONSTRAINTS = _Kind("constraint", "keras.constraints", (NonNeg, UnitNorm, MaxNorm, MinMaxNorm))


# ----------------------------------------------------------------------------- dtype policies


@dataclass(frozen=True)
class DTypePolicy:
    """A layer's dtype policy: the dtype it computes and outputs in,
    and the dtype its weights are stored in (never 16 bits)."""

    name: str
    compute_dtype: np.dtype
    variable_dtype: np.dtype

    def get_config(self) -> dict[str, Any]:
        return {"name": self.name}


# name: (compute dtype, variable dtype). Built when asked for: bfloat16 imports ml_dtypes.
_POLICIES = {
    "float32": ("float32", "float32"),
    "float64": ("float64", "float64"),
    # cbn: Keras stores float16 variables under "float16"; cbn keeps them float32.
    "float16": ("float16", "float32"),
    "mixed_float16": ("float16", "float32"),
    "mixed_bfloat16": ("bfloat16", "float32"),
}


def get_policy(identifier) -> DTypePolicy:
    """Resolve ``dtype=``: ``None`` (float32), a policy name, a Keras 3
    ``DTypePolicy`` dict or tf.keras 2 ``Policy`` dict, a Keras policy object
    (anything with a string ``name``), or a NumPy dtype."""
    name = identifier
    if identifier is None:
        name = "float32"
    elif isinstance(identifier, DTypePolicy):
        return identifier
    elif isinstance(identifier, dict):
        config = identifier.get("config")
        name = config.get("name") if isinstance(config, dict) else None
    elif isinstance(getattr(identifier, "name", None), str):
        name = identifier.name
    elif not isinstance(identifier, str):
        try:
            name = np.dtype(identifier).name
        except TypeError:
            name = None
    if name not in _POLICIES:
        raise ValueError(
            f"dtype={identifier!r} is not supported; expected None or one of {list(_POLICIES)} "
            "(or a Keras DTypePolicy config naming one)"
        )
    compute, variable = _POLICIES[name]
    compute_dtype = bfloat16() if compute == "bfloat16" else np.dtype(compute)
    return DTypePolicy(name, compute_dtype, np.dtype(variable))


def serialize_policy(policy: DTypePolicy) -> dict[str, Any]:
    """Keras 3's ``DTypePolicy`` serialization."""
    return _entry("keras", "DTypePolicy", policy.get_config())
