"""Training checks of cbn.keras on ONE training Keras backend (jax, tensorflow, torch; run
per backend by tests/test_keras.py, in its own process): gradients, fit, digits."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import cbn.keras  # noqa: E402

BACKEND = keras.backend.backend()
RNG = np.random.default_rng(11)


def gradients(layer, x, upstream, training):
    """d(sum(layer(x) * upstream)) / d(x, *trainable weights), with the backend's autodiff
    (compiled: jax.jit / tf.function)."""
    if BACKEND == "jax":
        import jax

        def loss(trainable, x, non_trainable):
            y, _ = layer.stateless_call(trainable, non_trainable, x, training=training)
            return (y * upstream).sum()

        trainable = [v.value for v in layer.trainable_variables]
        non_trainable = [v.value for v in layer.non_trainable_variables]
        d_weights, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(trainable, x, non_trainable)
        return [np.asarray(dx)] + [np.asarray(g) for g in d_weights]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function
        def grads(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(layer(x, training=training) * upstream)
            return tape.gradient(loss, [x] + [v.value for v in layer.trainable_variables])

        return [g.numpy() for g in grads(tf.constant(x))]
    import torch

    x = torch.tensor(x, requires_grad=True)
    (layer(x, training=training) * torch.tensor(upstream)).sum().backward()
    return [x.grad.numpy()] + [v.value.grad.numpy() for v in layer.trainable_variables]


@pytest.mark.parametrize(("training", "kwargs"), [
    (True, {}), (False, {}),
    (True, {"renorm": True, "renorm_clipping": {"rmax": 1.1, "rmin": 0.9, "dmax": 0.2}}),
])
def test_gradients_match_keras(training, kwargs):
    from keras_checks import pair

    shape = (6, 5, 4)
    layers = pair(shape, momentum=0.5, **kwargs)
    x = RNG.normal(1.0, 2.0, shape).astype("float32")
    upstream = RNG.normal(size=shape).astype("float32")
    expected, got = (gradients(layer, x, upstream, training) for layer in layers)
    assert len(got) == 3
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kwargs", [
    {"virtual_batch_size": 3},
    {"virtual_batch_size": 2, "renorm": True, "renorm_clipping": {"rmax": 1.2, "dmax": 0.3}},
])
def test_ghost_batch_gradients_match_the_numpy_layer(kwargs):
    """The NumPy layer's backward (float64 per-channel sums) of the same composed formula."""
    from keras_checks import ghost_pair

    shape = (12, 4, 3)
    numpy_layer, ours = ghost_pair(shape, **kwargs)
    x = RNG.normal(1.0, 2.0, shape).astype("float32")
    upstream = RNG.normal(size=shape).astype("float32")
    got = gradients(ours, x, upstream, training=True)
    numpy_layer(x, training=True)
    expected = [numpy_layer.backward(upstream), *numpy_layer.gradients]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def test_gradients_with_adjustment_match_the_numpy_layer():
    from keras_checks import adjustment, numpy_layer_twin, random_weights

    shape = (6, 5, 3)
    layer = cbn.keras.BatchNormalization(adjustment=adjustment)
    layer.build(shape)
    layer.set_weights(random_weights(shape, 3))
    twin = numpy_layer_twin(layer, shape)
    x = RNG.normal(1.0, 2.0, shape).astype("float32")
    upstream = RNG.normal(size=shape).astype("float32")
    got = gradients(layer, x, upstream, training=True)
    twin(x, training=True)
    expected = [twin.backward(upstream), *twin.gradients]
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4)


def small_model(norm_cls, seed=3, **kwargs):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8),
        norm_cls(momentum=0.8, **kwargs),
        keras.layers.Dense(2),
    ])


@pytest.mark.parametrize("kwargs", [{}, {"renorm": True, "renorm_momentum": 0.5,
                                         "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}}])
def test_fit_matches_keras_weights_and_moving_statistics(kwargs):
    from keras_checks import fit_alike_and_compare

    x = RNG.normal(3.0, 2.0, (64, 6)).astype("float32")
    y = RNG.normal(size=(64, 2)).astype("float32")
    models = []
    for cls in (keras.layers.BatchNormalization, cbn.keras.BatchNormalization):
        model = small_model(cls, **kwargs)
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        models.append(model)
    fit_alike_and_compare(models, x, y)
    np.testing.assert_allclose(models[1].predict(x, verbose=0), models[0].predict(x, verbose=0),
                               rtol=1e-4, atol=1e-4)
    assert np.isclose(models[1].evaluate(x, y, verbose=0), models[0].evaluate(x, y, verbose=0),
                      rtol=1e-4)


def test_ghost_batches_in_fit_update_moving_statistics_as_the_numpy_layer():
    """fit's compiled step (a dynamic batch size on TensorFlow): the moving statistics
    depend on the input batches only, so the NumPy layer fed the same batches agrees."""
    x = RNG.normal(2.0, 3.0, (48, 5)).astype("float32")
    model = keras.Sequential([keras.Input((5,)), cbn.keras.BatchNormalization(
        momentum=0.7, virtual_batch_size=4)])
    model.compile(optimizer="sgd", loss="mse")
    numpy_layer = cbn.BatchNormalization(momentum=0.7, virtual_batch_size=4)
    numpy_layer.build(x.shape)
    model.fit(x, x, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for start in range(0, 48, 16):
        numpy_layer(x[start:start + 16], training=True)
    norm = model.layers[0]
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(getattr(norm, name)),
                                   getattr(numpy_layer, name), rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="virtual_batch_size=4 must divide"):
        model.fit(x[:10], x[:10], batch_size=10, verbose=0)


def test_functional_subclassed_and_train_on_batch():
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(1)(cbn.keras.BatchNormalization()(inputs))
    functional = keras.Model(inputs, outputs)

    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.norm = cbn.keras.BatchNormalization()
            self.dense = keras.layers.Dense(1)

        def call(self, x, training=None):
            return self.dense(self.norm(x, training=training))

    x = RNG.normal(5.0, 1.0, (32, 6)).astype("float32")
    y = RNG.normal(size=(32, 1)).astype("float32")
    for model in (functional, Subclassed()):
        model.compile(optimizer="sgd", loss="mse")
        model.train_on_batch(x, y)
        norm = [layer for layer in model.layers
                if isinstance(layer, cbn.keras.BatchNormalization)][0]
        expected = 0.99 * 0.0 + 0.01 * x.mean(axis=0)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(norm.moving_mean), expected,
                                   rtol=1e-5)


def test_frozen_layer_in_fit_keeps_its_weights():
    model = small_model(cbn.keras.BatchNormalization)
    model.layers[1].trainable = False
    model.compile(optimizer="sgd", loss="mse")
    before = model.layers[1].get_weights()
    model.fit(RNG.normal(size=(32, 6)), RNG.normal(size=(32, 2)), verbose=0)
    for a, b in zip(before, model.layers[1].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_digits_cnn_reaches_95_percent():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=0, stratify=digits.target)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
        cbn.keras.BatchNormalization(momentum=0.9),
        keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(32, 3, padding="same", use_bias=False),
        cbn.keras.BatchNormalization(momentum=0.9),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer=keras.optimizers.Adam(0.003), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=32, epochs=5, verbose=0)
    accuracy = model.evaluate(x_test, y_test, verbose=0)[1]
    print(f"digits test accuracy on {BACKEND}: {accuracy:.4f}")
    assert accuracy >= 0.95
