"""cbn's training and inference kernels as differentiable operations of each Keras backend.

Every backend wraps the same NumPy functions (:mod:`cbn.ops`), so all of them compute
with cbn's exact forward and backward:

- ``train(x, gamma, beta, mask, axes, epsilon) -> (y, batch_mean, batch_variance)``,
  differentiable w.r.t. ``x``, ``gamma`` and ``beta`` through the batch statistics; the
  statistics (biased variance; float64 for float64 ``x``, float32 otherwise) carry no
  gradient (they only feed the moving averages).
- ``infer(x, mean, variance, gamma, beta, axes, epsilon) -> y`` with fixed statistics,
  differentiable w.r.t. ``x``, ``gamma`` and ``beta``.

``gamma`` and ``beta`` are always arrays of the channel shape (the layer passes ones and
zeros when ``scale``/``center`` is off); ``axes`` are the non-negative channel axes.
"""

from __future__ import annotations

import functools

import numpy as np

from .. import ops

__all__ = ["kernels_for"]


def _stats_dtype(x_dtype) -> np.dtype:
    return np.dtype(np.float64) if np.dtype(x_dtype) == np.float64 else np.dtype(np.float32)


def _channel_shape(shape, axes) -> tuple[int, ...]:
    return tuple(int(shape[a]) for a in axes)


def np_train(x, gamma, beta, mask, axes, epsilon):
    y, mean, var = ops.batch_norm_train(
        np.asarray(x), gamma=gamma, beta=beta, axis=list(axes), epsilon=epsilon, mask=mask
    )
    return y, mean, var


def np_infer(x, mean, variance, gamma, beta, axes, epsilon):
    return ops.batch_normalization(
        np.asarray(x), mean, variance, gamma=gamma, beta=beta, axis=list(axes), epsilon=epsilon
    )


def np_backward(dy, x, mean, variance, gamma, mask, axes, epsilon, training):
    """``(dx, dgamma, dbeta)``; the parameter gradients in ``gamma``'s dtype."""
    dx, dgamma, dbeta = ops.batch_norm_backward(
        np.asarray(dy), np.asarray(x), mean, variance, gamma=gamma, axis=list(axes),
        epsilon=epsilon, mask=mask, training=training,
    )
    gamma_dtype = np.asarray(gamma).dtype
    return dx, dgamma.astype(gamma_dtype), dbeta.astype(gamma_dtype)


class _NumpyKernels:
    """Keras' numpy backend: forward only (it has no gradients)."""

    @staticmethod
    def train(x, gamma, beta, mask, axes, epsilon):
        return np_train(x, gamma, beta, mask, axes, epsilon)

    @staticmethod
    def infer(x, mean, variance, gamma, beta, axes, epsilon):
        return np_infer(x, mean, variance, gamma, beta, axes, epsilon)


@functools.cache
def _jax_train(axes: tuple[int, ...], epsilon: float):
    import jax

    def forward_callback(x, gamma, beta, mask):
        cshape = _channel_shape(x.shape, axes)
        stats = jax.ShapeDtypeStruct(cshape, _stats_dtype(x.dtype))
        shapes = (jax.ShapeDtypeStruct(x.shape, x.dtype), stats, stats)
        return jax.pure_callback(
            lambda *a: np_train(*a, axes, epsilon), shapes, x, gamma, beta, mask
        )

    @jax.custom_vjp
    def train(x, gamma, beta, mask):
        return forward_callback(x, gamma, beta, mask)

    def train_fwd(x, gamma, beta, mask):
        y, mean, var = forward_callback(x, gamma, beta, mask)
        return (y, mean, var), (x, mean, var, gamma, mask)

    def train_bwd(residuals, cotangents):
        x, mean, var, gamma, mask = residuals
        shapes = (
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct(gamma.shape, gamma.dtype),
            jax.ShapeDtypeStruct(gamma.shape, gamma.dtype),
        )
        dx, dgamma, dbeta = jax.pure_callback(
            lambda dy, *a: np_backward(dy, *a, axes, epsilon, True),
            shapes, cotangents[0], x, mean, var, gamma, mask,
        )
        return dx, dgamma, dbeta, None

    train.defvjp(train_fwd, train_bwd)
    return train


@functools.cache
def _jax_infer(axes: tuple[int, ...], epsilon: float):
    import jax

    def forward_callback(x, mean, variance, gamma, beta):
        shape = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return jax.pure_callback(
            lambda *a: np_infer(*a, axes, epsilon), shape, x, mean, variance, gamma, beta
        )

    @jax.custom_vjp
    def infer(x, mean, variance, gamma, beta):
        return forward_callback(x, mean, variance, gamma, beta)

    def infer_fwd(x, mean, variance, gamma, beta):
        return forward_callback(x, mean, variance, gamma, beta), (x, mean, variance, gamma)

    def infer_bwd(residuals, dy):
        x, mean, variance, gamma = residuals
        shapes = (
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct(gamma.shape, gamma.dtype),
            jax.ShapeDtypeStruct(gamma.shape, gamma.dtype),
        )
        dx, dgamma, dbeta = jax.pure_callback(
            lambda *a: np_backward(*a, None, axes, epsilon, False),
            shapes, dy, x, mean, variance, gamma,
        )
        # Moving statistics are not trainable: no gradient flows to them.
        return dx, None, None, dgamma, dbeta

    infer.defvjp(infer_fwd, infer_bwd)
    return infer


class _JaxKernels:
    @staticmethod
    def train(x, gamma, beta, mask, axes, epsilon):
        return _jax_train(axes, epsilon)(x, gamma, beta, mask)

    @staticmethod
    def infer(x, mean, variance, gamma, beta, axes, epsilon):
        return _jax_infer(axes, epsilon)(x, mean, variance, gamma, beta)


def tf_numpy_call(tf, function, inputs, output_specs):
    """``tf.numpy_function`` whose outputs get the ``(dtype, static shape)`` pairs of
    ``output_specs`` (a shape may hold None: a ghost count under a dynamic batch)."""
    results = tf.numpy_function(
        function, inputs, [dtype for dtype, _ in output_specs], stateful=False
    )
    if not isinstance(results, (list, tuple)):  # one output comes back bare
        results = [results]
    for result, (_, shape) in zip(results, output_specs, strict=True):
        result.set_shape(shape)
    return results


def tf_spec(tensor):
    return tensor.dtype, tensor.shape


def tf_stats_spec(tf, x, axes):
    """The spec of the statistics of ``x`` over the channel ``axes``."""
    return (tf.as_dtype(_stats_dtype(x.dtype.as_numpy_dtype)),
            tf.TensorShape([x.shape[a] for a in axes]))


def optional(masks: list):
    return masks[0] if masks else None


class _TensorFlowKernels:
    @staticmethod
    def train(x, gamma, beta, mask, axes, epsilon):
        import tensorflow as tf

        x, gamma, beta = (tf.convert_to_tensor(t) for t in (x, gamma, beta))
        masks = [] if mask is None else [tf.convert_to_tensor(mask)]
        stats = tf_stats_spec(tf, x, axes)

        @tf.custom_gradient
        def train(x, gamma, beta):
            y, mean, var = tf_numpy_call(
                tf, lambda x, g, b, *m: np_train(x, g, b, optional(m), axes, epsilon),
                [x, gamma, beta, *masks], [tf_spec(x), stats, stats],
            )

            def grad(dy, *_statistics_cotangents):
                return tuple(tf_numpy_call(
                    tf, lambda *a: np_backward(*a[:5], optional(a[5:]), axes, epsilon, True),
                    [dy, x, mean, var, gamma, *masks], [tf_spec(x), tf_spec(gamma),
                                                        tf_spec(gamma)],
                ))

            return (y, mean, var), grad

        return train(x, gamma, beta)

    @staticmethod
    def infer(x, mean, variance, gamma, beta, axes, epsilon):
        import tensorflow as tf

        x, mean, variance, gamma, beta = (
            tf.convert_to_tensor(t) for t in (x, mean, variance, gamma, beta)
        )

        @tf.custom_gradient
        def infer(x, gamma, beta):
            (y,) = tf_numpy_call(
                tf, lambda *a: np_infer(*a, axes, epsilon), [x, mean, variance, gamma, beta],
                [tf_spec(x)],
            )

            def grad(dy):
                return tuple(tf_numpy_call(
                    tf, lambda *a: np_backward(*a, None, axes, epsilon, False),
                    [dy, x, mean, variance, gamma], [tf_spec(x), tf_spec(gamma), tf_spec(gamma)],
                ))

            return y, grad

        return infer(x, gamma, beta)


_KERNELS = {"numpy": _NumpyKernels, "jax": _JaxKernels, "tensorflow": _TensorFlowKernels}


def kernels_for(backend: str):
    """The kernels of Keras backend ``backend``; a clear error for one cbn cannot serve."""
    if backend == "torch":
        from ._torch_kernels import TorchKernels

        return TorchKernels
    try:
        return _KERNELS[backend]
    except KeyError:
        raise NotImplementedError(
            f"cbn.keras.BatchNormalization does not support the Keras backend {backend!r}; "
            "it runs on the torch, jax, tensorflow and numpy backends"
        ) from None
