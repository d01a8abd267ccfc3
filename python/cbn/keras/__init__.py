"""Keras 3 integration: :class:`BatchNormalization`, a ``keras.layers.Layer`` computed by
cbn on the torch, JAX, TensorFlow and numpy backends, :func:`convert`, which swaps
it into an existing model, and :func:`fold`, which merges batch normalizations into the
Dense/Conv layers before them for inference. Needs Keras 3 (``pip install "cbn[keras]"``)."""

from __future__ import annotations

try:
    import keras
except ImportError as err:
    raise ImportError(
        'cbn.keras needs Keras 3: pip install "cbn[keras]" (keras with jax and tensorflow-cpu) '
        "or install keras and one of its backends"
    ) from err

if not keras.__version__.startswith("3."):
    raise ImportError(f"cbn.keras needs Keras 3; found keras {keras.__version__}")

from ._fold import Folded, fold, fold_weights  # noqa: E402
from ._layer import BatchNormalization, convert  # noqa: E402

__all__ = ["BatchNormalization", "Folded", "convert", "fold", "fold_weights"]
