"""Checks of cbn.keras on ONE Keras backend: run by tests/test_keras.py as
``KERAS_BACKEND=<backend> python -m pytest tests/keras_checks.py`` in its own process
(Keras picks its backend once, at import). The oracle is keras.layers.BatchNormalization
on the same backend."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")

import cbn  # noqa: E402
import cbn.keras  # noqa: E402

BACKEND = keras.backend.backend()
RNG = np.random.default_rng(7)


def random_weights(layer_shape, channels, scale=True, center=True):
    weights = []
    if scale:
        weights.append(RNG.uniform(0.5, 1.5, channels).astype("float32"))
    if center:
        weights.append(RNG.normal(size=channels).astype("float32"))
    weights += [RNG.normal(size=channels).astype("float32"),
                RNG.uniform(0.5, 2.0, channels).astype("float32")]
    return weights


def pair(input_shape, **kwargs):
    """(Keras' layer, cbn's) built on ``input_shape``, with the same random weights."""
    reference, ours = keras.layers.BatchNormalization(**kwargs), cbn.keras.BatchNormalization(
        **kwargs)
    reference.build(input_shape)
    ours.build(input_shape)
    ours.set_weights(random_weights(input_shape, input_shape[-1],
                                    kwargs.get("scale", True), kwargs.get("center", True)))
    reference.set_weights(ours.get_weights())
    return reference, ours


def test_is_a_keras_layer_with_keras_weights():
    reference, ours = pair((4, 6, 6, 3))
    assert isinstance(ours, keras.layers.Layer)
    describe = [(w.path.split("/")[-1], tuple(w.shape), w.dtype, w.trainable)
                for w in ours.weights]
    assert describe == [(w.path.split("/")[-1], tuple(w.shape), w.dtype, w.trainable)
                        for w in reference.weights]
    assert [w.path.split("/")[-1] for w in ours.weights] == [
        "gamma", "beta", "moving_mean", "moving_variance"]
    for a, b in zip(reference.get_weights(), ours.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_config_has_keras_keys_and_round_trips():
    reference = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-4, center=False)
    ours = cbn.keras.BatchNormalization(momentum=0.9, epsilon=1e-4, center=False)
    assert set(ours.get_config()) >= set(reference.get_config())
    clone = cbn.keras.BatchNormalization.from_config(ours.get_config())
    assert clone.get_config() == ours.get_config()
    from_keras = cbn.keras.BatchNormalization.from_config(reference.get_config())
    assert from_keras.momentum == 0.9 and from_keras.center is False


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("kwargs", [{}, {"scale": False, "center": False}, {"axis": 1}])
def test_outputs_and_moving_statistics_match_keras(training, kwargs):
    shape = (8, 5, 4, 3)
    reference, ours = pair(shape, **kwargs) if "axis" not in kwargs else (None, None)
    if reference is None:  # channels first: weights of the axis-1 size
        reference = keras.layers.BatchNormalization(axis=1)
        ours = cbn.keras.BatchNormalization(axis=1)
        reference.build(shape)
        ours.build(shape)
        ours.set_weights(random_weights(shape, shape[1]))
        reference.set_weights(ours.get_weights())
    x = RNG.normal(2.0, 3.0, shape).astype("float32")
    for _ in range(3):
        expected = keras.ops.convert_to_numpy(reference(x, training=training))
        got = keras.ops.convert_to_numpy(ours(x, training=training))
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    for a, b in zip(reference.get_weights(), ours.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_mask_matches_keras():
    reference, ours = pair((6, 7, 4))
    x = RNG.normal(size=(6, 7, 4)).astype("float32")
    mask = RNG.random((6, 7)) < 0.6
    expected = reference(x, training=True, mask=mask)
    got = ours(x, training=True, mask=mask)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(got),
                               keras.ops.convert_to_numpy(expected), rtol=1e-4, atol=1e-4)
    for a, b in zip(reference.get_weights(), ours.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_mask_is_propagated():
    inputs = keras.Input((5,), dtype="int32")
    embedded = keras.layers.Embedding(10, 4, mask_zero=True)(inputs)
    normalized = cbn.keras.BatchNormalization()(embedded)
    assert getattr(normalized, "_keras_mask", None) is not None


def test_trainable_false_is_inference_and_freezes():
    reference, ours = pair((8, 3))
    ours.trainable = False
    before = ours.get_weights()
    x = RNG.normal(size=(8, 3)).astype("float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours(x, training=True)),
                               keras.ops.convert_to_numpy(reference(x, training=False)),
                               rtol=1e-5, atol=1e-5)
    assert ours.trainable_weights == []
    for a, b in zip(before, ours.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_matches_keras(policy):
    reference = keras.layers.BatchNormalization(dtype=policy)
    ours = cbn.keras.BatchNormalization(dtype=policy)
    x = RNG.normal(1.0, 2.0, (16, 4)).astype("float32")
    for layer in (reference, ours):
        layer.build(x.shape)
    reference.set_weights(ours.get_weights())
    for training in (True, False):
        got, expected = ours(x, training=training), reference(x, training=training)
        assert keras.backend.standardize_dtype(got.dtype) == policy.split("_")[1]
        np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.cast(got, "float32")),
                                   keras.ops.convert_to_numpy(
                                       keras.ops.cast(expected, "float32")),
                                   rtol=2e-2, atol=2e-2)
    assert [w.dtype for w in ours.weights] == ["float32"] * 4


def unsupported_arguments():
    return [{"renorm": True}, {"virtual_batch_size": 2}, {"synchronized": True}]


@pytest.mark.parametrize("kwargs", unsupported_arguments())
def test_unsupported_arguments_raise_naming_cbn_keras(kwargs):
    with pytest.raises(NotImplementedError, match="cbn.keras.BatchNormalization"):
        cbn.keras.BatchNormalization(**kwargs)


def test_bad_arguments_raise_the_numpy_layer_errors():
    with pytest.raises(TypeError, match="center must be a bool"):
        cbn.keras.BatchNormalization(center="yes")
    with pytest.raises(ValueError, match="epsilon"):
        cbn.keras.BatchNormalization(epsilon=-1.0)


def test_keras_tensor_to_numpy_layer_names_cbn_keras():
    symbolic = keras.Input((3,))
    with pytest.raises(TypeError, match="cbn.keras"):
        cbn.BatchNormalization()(symbolic)


def model_with_random_weights(norm_cls):
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4), norm_cls(),
                              keras.layers.Dense(2)])
    model.layers[1].set_weights(random_weights((None, 4), 4))
    return model


def test_keras_file_round_trip(tmp_path):
    model = model_with_random_weights(cbn.keras.BatchNormalization)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert isinstance(loaded.layers[1], cbn.keras.BatchNormalization)
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    x = RNG.normal(size=(5, 6)).astype("float32")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


def test_convert_replaces_keras_layers_and_keeps_weights():
    model = model_with_random_weights(keras.layers.BatchNormalization)
    converted = cbn.keras.convert(model)
    assert isinstance(converted.layers[1], cbn.keras.BatchNormalization)
    assert not any(type(layer) is keras.layers.BatchNormalization for layer in converted.layers)
    x = RNG.normal(size=(5, 6)).astype("float32")
    np.testing.assert_allclose(converted.predict(x, verbose=0), model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="keras.Model"):
        cbn.keras.convert(model.layers[1])


def adjustment(shape):
    return np.array([1.5, 0.5, 2.0], "float32"), 0.25


def numpy_layer_twin(layer, shape):
    """cbn.BatchNormalization (the NumPy layer, the oracle for tf.keras 2's extras) with
    ``layer``'s arguments and weights."""
    twin = cbn.BatchNormalization(momentum=layer.momentum, epsilon=layer.epsilon,
                                  adjustment=layer.adjustment)
    twin.build(shape)
    twin.set_weights(layer.get_weights())
    return twin


def test_adjustment_matches_the_numpy_layer():
    shape = (10, 4, 3)
    ours = cbn.keras.BatchNormalization(momentum=0.7, adjustment=adjustment)
    ours.build(shape)
    ours.set_weights(random_weights(shape, 3))
    twin = numpy_layer_twin(ours, shape)
    x = RNG.normal(1.0, 3.0, shape).astype("float32")
    for training in (True, False):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(ours(x, training=training)),
                                   twin(x, training=training), rtol=1e-5, atol=1e-5)
    for a, b in zip(twin.get_weights(), ours.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    bad = cbn.keras.BatchNormalization(adjustment=lambda shape: (np.ones(2), 0.0))
    with pytest.raises(ValueError, match="adjustment"):
        bad(x, training=True)
