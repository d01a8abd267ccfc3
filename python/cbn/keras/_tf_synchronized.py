"""``synchronized=True`` on the TensorFlow backend: batch statistics of the global batch
of a ``tf.distribute`` strategy, with cbn's exact merge and backward.

Each replica sums cbn's per-channel buffers with the replica context's ``all_reduce``
(one collective forward, one backward, as ``cbn.ops`` does with an ``allreduce``
callback): forward, the partial moments (used counts, shifted sums, shifted sums of
squares, around the moving mean that every replica shares), so uneven per-replica
batches and masks give the statistics of the union of the used positions; backward,
the used counts, ``Σdy`` and ``Σdy·x̂``, so ``dx`` goes through the global statistics.
``dγ`` and ``dβ`` stay the replica's own: the optimizer sums them across replicas, as
for every other weight. Without a strategy (one replica in sync, or the cross-replica
context) it is the unsynchronized kernel.
"""

from __future__ import annotations

import math

import numpy as np

from .. import _core
from .._validate import canonical_mask
from ..distributed import check_reduced
from ._kernels import kernels_for, optional, tf_numpy_call, tf_spec, tf_stats_spec

__all__ = ["train_synchronized"]


def _flat64(values) -> np.ndarray:
    return np.ascontiguousarray(values, dtype=np.float64).reshape(-1)


def _mask(masks, x) -> np.ndarray | None:
    mask = optional(masks)
    return None if mask is None else canonical_mask(mask, x.shape)


def train_synchronized(x, gamma, beta, mask, axes, epsilon, shift):
    """``(y, batch_mean, batch_variance)`` as the kernels' ``train``, with the statistics
    of every replica's batch; ``shift`` is the (replica-identical) moving mean."""
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return kernels_for("tensorflow").train(x, gamma, beta, mask, axes, epsilon)
    x, gamma, beta, shift = (tf.convert_to_tensor(t) for t in (x, gamma, beta, shift))
    masks = [] if mask is None else [tf.convert_to_tensor(mask)]
    channels = math.prod(int(x.shape[a]) for a in axes)
    buffer = (tf.float64, tf.TensorShape([3 * channels]))
    statistics64 = (tf.float64, tf.TensorShape([channels]))
    stats_dtype, cshape = tf_stats_spec(tf, x, axes)

    def all_replicas(buf):
        return context.all_reduce(tf.distribute.ReduceOp.SUM, buf)

    @tf.custom_gradient
    def train(x, gamma, beta):
        (partial,) = tf_numpy_call(
            tf, lambda x, k, *m: _core.moments_partial(x, axes, _mask(m, x), _flat64(k)),
            [x, shift, *masks], [buffer])
        y, mean, var = tf_numpy_call(tf, _normalize_with_total(axes, epsilon),
                                     [x, all_replicas(partial), shift, gamma, beta],
                                     [tf_spec(x), statistics64, statistics64])

        def grad(dy, *_statistics_cotangents):
            (sums,) = tf_numpy_call(
                tf, lambda dy, x, mean, var, *m: _core.backward_sums(
                    dy, x, axes, _mask(m, x), mean, var, epsilon),
                [dy, x, mean, var, *masks], [buffer])
            (dx,) = tf_numpy_call(tf, _backward_with_total(axes, epsilon),
                                  [dy, x, mean, var, gamma, all_replicas(sums), *masks],
                                  [tf_spec(x)])
            # sums = (counts, Σdy, Σdy·x̂): this replica's dβ and dγ.
            dgamma = tf.reshape(tf.cast(sums[2 * channels:], gamma.dtype), gamma.shape)
            dbeta = tf.reshape(tf.cast(sums[channels:2 * channels], gamma.dtype), gamma.shape)
            return dx, dgamma, dbeta

        outputs = [tf.reshape(tf.cast(s, stats_dtype), cshape) for s in (mean, var)]
        return (y, *outputs), grad

    return train(x, gamma, beta)


def _normalize_with_total(axes, epsilon):
    def normalize(x, total, shift, gamma, beta):
        mean, var = _core.moments_finalize(check_reduced(total), _flat64(shift))
        y = np.empty_like(x)
        _core.normalize(x, y, axes, mean, var, _flat64(gamma), _flat64(beta), epsilon)
        return y, mean, var

    return normalize


def _backward_with_total(axes, epsilon):
    def backward(dy, x, mean, var, gamma, total, *masks):
        dx = np.empty_like(x)
        _core.backward_apply(dy.astype(x.dtype, copy=False), x, dx, axes, _mask(masks, x),
                             mean, var, _flat64(gamma), epsilon, check_reduced(total))
        return dx

    return backward
