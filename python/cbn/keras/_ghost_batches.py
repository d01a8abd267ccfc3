"""Ghost batch normalization (tf.keras 2's ``virtual_batch_size``) with backend ops
around cbn's training kernel.

The batch ``(B, ...)`` is reshaped to ``(V, B/V, ...)`` (tf.keras 2's order, the one
the NumPy layer's strided view reads): ghost batch ``g`` holds the samples
``{b : b mod (B/V) = g}``. The kernel normalizes per (ghost batch, channel) — axis 1
joins the kept axes — with γ and β broadcast over the ghost batches (so autodiff sums
their gradients), and the moving statistics get the per-channel averages over the
ghost batches of their means and of their variances.
"""

from __future__ import annotations

import keras
from keras import ops

__all__ = ["ghost_batches_train"]


def ghost_batches_train(train, x, gamma, beta, mask, axes, epsilon, virtual_batch_size):
    """``train(x, gamma, beta, mask, axes, epsilon)`` (a kernel) per ghost batch of
    ``virtual_batch_size`` samples: ``(y, averaged mean, averaged variance)``."""
    shape = tuple(ops.shape(x))
    x = _checked_divisible(x, shape[0], virtual_batch_size)
    view = (virtual_batch_size, -1, *shape[1:])
    ghost_x = ops.reshape(x, view)
    ghosts = ops.shape(ghost_x)[1]
    if mask is not None:  # (B, ..., 1) from the layer: reshaped like x
        mask = ops.reshape(mask, (virtual_batch_size, -1, *tuple(ops.shape(mask))[1:]))
    per_ghost = (ghosts, *tuple(ops.shape(gamma)))
    y, mean, variance = train(
        ghost_x, ops.broadcast_to(gamma, per_ghost), ops.broadcast_to(beta, per_ghost), mask,
        (1, *(axis + 1 for axis in axes)), epsilon,
    )
    return ops.reshape(y, shape), ops.mean(mean, axis=0), ops.mean(variance, axis=0)


def _checked_divisible(x, batch, virtual_batch_size):
    """``x``, once its batch size is known to be a multiple of ``virtual_batch_size``:
    checked now when the size is static, else (TensorFlow graphs) when the graph runs."""
    message = (
        f"cbn.keras.BatchNormalization: virtual_batch_size={virtual_batch_size} must divide "
        "the batch size in training"
    )
    if isinstance(batch, int):
        if batch % virtual_batch_size:
            raise ValueError(f"{message}; received inputs of shape {tuple(x.shape)}")
        return x
    if keras.backend.backend() != "tensorflow":  # only TensorFlow has symbolic batch sizes
        return x
    import tensorflow as tf

    check = tf.debugging.assert_equal(batch % virtual_batch_size, 0, message=message)
    with tf.control_dependencies([check]):
        return tf.identity(x)
