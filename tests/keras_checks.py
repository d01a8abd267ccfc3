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


def random_weights(layer_shape, channels, scale=True, center=True, renorm=False):
    weights = []
    if scale:
        weights.append(RNG.uniform(0.5, 1.5, channels).astype("float32"))
    if center:
        weights.append(RNG.normal(size=channels).astype("float32"))
    weights += [RNG.normal(size=channels).astype("float32"),
                RNG.uniform(0.5, 2.0, channels).astype("float32")]
    if renorm:  # moving_stddev, renorm_mean, renorm_stddev
        weights += [RNG.uniform(0.7, 1.4, channels).astype("float32"),
                    RNG.normal(size=channels).astype("float32"),
                    RNG.uniform(0.5, 2.0, channels).astype("float32")]
    return weights


def pair(input_shape, **kwargs):
    """(Keras' layer, cbn's) built on ``input_shape``, with the same random weights."""
    reference, ours = keras.layers.BatchNormalization(**kwargs), cbn.keras.BatchNormalization(
        **kwargs)
    reference.build(input_shape)
    ours.build(input_shape)
    ours.set_weights(random_weights(input_shape, input_shape[-1], kwargs.get("scale", True),
                                    kwargs.get("center", True), kwargs.get("renorm", False)))
    reference.set_weights(ours.get_weights())
    return reference, ours


def fit_alike_and_compare(models, x, y):
    """Fit Keras' model and cbn's (models[0], models[1]) alike from the same weights;
    their weights (moving statistics included) must end equal."""
    models[1].set_weights(models[0].get_weights())
    for model in models:
        model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for e, g in zip(models[0].get_weights(), models[1].get_weights(), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def assert_weights_close(expected_layer, got_layer, rtol=1e-5, atol=1e-6):
    for a, b in zip(expected_layer.get_weights(), got_layer.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=rtol, atol=atol)


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


# ---------------------------------------------------------------- renorm (oracle: Keras' layer)

CLIPPINGS = [{}, {"rmax": 1.1, "rmin": 0.95, "dmax": 0.05}, {"rmin": 0.9, "dmax": None}]


def test_renorm_weights_are_keras_weights_both_ways():
    reference, ours = pair((4, 5, 3), renorm=True)
    describe = [(w.path.split("/")[-1], tuple(w.shape), w.dtype, w.trainable)
                for w in ours.weights]
    assert describe == [(w.path.split("/")[-1], tuple(w.shape), w.dtype, w.trainable)
                        for w in reference.weights]
    assert [d[0] for d in describe] == ["gamma", "beta", "moving_mean", "moving_variance",
                                        "moving_stddev", "renorm_mean", "renorm_stddev"]
    variance_init = keras.initializers.Constant(2.25)
    fresh = keras.layers.BatchNormalization(renorm=True, moving_variance_initializer=variance_init)
    fresh.build((4, 3))
    ours = cbn.keras.BatchNormalization(renorm=True, moving_variance_initializer=variance_init)
    ours.build((4, 3))  # initial values: √(variance initializer) for both stddevs
    assert_weights_close(fresh, ours, rtol=0, atol=0)
    ours.set_weights(random_weights((4, 3), 3, renorm=True))
    fresh.set_weights(ours.get_weights())  # and back: Keras' layer takes cbn's weights
    assert_weights_close(ours, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("clipping", CLIPPINGS)
@pytest.mark.parametrize("use_mask", [False, True])
def test_renorm_outputs_and_statistics_match_keras(clipping, use_mask):
    shape = (8, 5, 3)
    reference, ours = pair(shape, renorm=True, renorm_clipping=clipping, renorm_momentum=0.6,
                           momentum=0.8, center=not use_mask)
    mask = RNG.random(shape[:-1]) < 0.7 if use_mask else None
    for step in range(3):
        x = RNG.normal(step, 2.0 + step, shape).astype("float32")
        for training in (True, False):
            expected = keras.ops.convert_to_numpy(reference(x, training=training, mask=mask))
            got = keras.ops.convert_to_numpy(ours(x, training=training, mask=mask))
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert_weights_close(reference, ours)


# ------------------------------------- ghost batches (oracles: NumPy layer, float64 formula)

def ghost_pair(shape, **kwargs):
    """(cbn.BatchNormalization, cbn.keras.BatchNormalization) with the same weights."""
    numpy_layer, ours = cbn.BatchNormalization(**kwargs), cbn.keras.BatchNormalization(**kwargs)
    ours.build(shape)
    numpy_layer.build(shape)
    ours.set_weights(random_weights(shape, shape[-1], renorm=kwargs.get("renorm", False)))
    numpy_layer.set_weights(ours.get_weights())
    return numpy_layer, ours


def ghost_reference(x, gamma, beta, virtual_batch_size, epsilon):
    """tf.keras 2's ghost batch normalization in float64: ghost g = {b : b mod (B/V) = g}."""
    x = x.astype(np.float64)
    ghosts = x.shape[0] // virtual_batch_size
    y = np.empty_like(x)
    means, variances = [], []
    for g in range(ghosts):
        members = x[g::ghosts]
        axes = tuple(range(x.ndim - 1))
        mean, variance = members.mean(axis=axes), members.var(axis=axes)
        y[g::ghosts] = (members - mean) / np.sqrt(variance + epsilon) * gamma + beta
        means.append(mean)
        variances.append(variance)
    return y, np.mean(means, axis=0), np.mean(variances, axis=0)


def test_ghost_batches_match_a_float64_reference():
    shape = (12, 4, 3)
    numpy_layer, ours = ghost_pair(shape, virtual_batch_size=3, momentum=0.5)
    gamma, beta, moving_mean, moving_variance = ours.get_weights()
    x = RNG.normal(1.0, 3.0, shape).astype("float32")
    expected, mean, variance = ghost_reference(x, gamma, beta, 3, 1e-3)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours(x, training=True)), expected,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.moving_mean, 0.5 * moving_mean + 0.5 * mean, rtol=1e-6)
    np.testing.assert_allclose(ours.moving_variance, 0.5 * moving_variance + 0.5 * variance,
                               rtol=1e-6)


@pytest.mark.parametrize("kwargs", [
    {"virtual_batch_size": 2},
    {"virtual_batch_size": 4, "renorm": True, "renorm_clipping": {"rmax": 1.2, "dmax": 0.1}},
    {"virtual_batch_size": 2, "axis": [2, 3], "scale": False},
    {"renorm": True, "renorm_momentum": 0.5, "adjustment": adjustment},
])
def test_tfkeras2_extras_match_the_numpy_layer(kwargs):
    shape = (8, 3, 4, 2) if "axis" in kwargs else (8, 5, 3)
    numpy_layer, ours = cbn.BatchNormalization(**kwargs), cbn.keras.BatchNormalization(**kwargs)
    ours.build(shape)
    numpy_layer.build(shape)
    numpy_layer.set_weights([RNG.uniform(0.5, 1.5, w.shape).astype("float32")
                             for w in numpy_layer.get_weights()])
    ours.set_weights(numpy_layer.get_weights())
    mask = None if "axis" in kwargs else RNG.random(shape[:-1]) < 0.8
    for step in range(2):
        x = RNG.normal(step, 2.0, shape).astype("float32")
        for training in (True, False):
            np.testing.assert_allclose(
                keras.ops.convert_to_numpy(ours(x, training=training, mask=mask)),
                numpy_layer(x, training=training, mask=mask), rtol=1e-4, atol=1e-4)
    assert_weights_close(numpy_layer, ours)


# ---------------------------------------------------------------- synchronized (off TF)

def test_synchronized_is_refused_off_tensorflow_as_keras():
    if BACKEND == "tensorflow":
        assert cbn.keras.BatchNormalization(synchronized=True).synchronized is True
        return
    with pytest.raises(ValueError, match="TensorFlow backend"):
        keras.layers.BatchNormalization(synchronized=True)
    with pytest.raises(ValueError, match="cbn.keras.BatchNormalization: synchronized=True"):
        cbn.keras.BatchNormalization(synchronized=True)


# ---------------------------------------------------------------- serialization, bad input

def test_new_arguments_round_trip_config_and_keras_file(tmp_path):
    kwargs = {"renorm": True, "renorm_clipping": {"rmax": 2.0}, "renorm_momentum": 0.7,
              "virtual_batch_size": 2}
    layer = cbn.keras.BatchNormalization(**kwargs)
    config = layer.get_config()
    assert {key: config[key] for key in kwargs} == kwargs
    assert cbn.keras.BatchNormalization.from_config(config).get_config() == config
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(4), layer])
    model.layers[1].set_weights(random_weights((None, 4), 4, renorm=True))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert loaded.layers[1].get_config() == config
    for a, b in zip(model.get_weights(), loaded.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    keras_layer = keras.layers.BatchNormalization(renorm=True, renorm_clipping={"dmax": 1.0})
    from_keras = cbn.keras.BatchNormalization.from_config(keras_layer.get_config())
    assert from_keras.renorm and from_keras.renorm_clipping == {"dmax": 1.0}


def test_convert_carries_renorm_weights():
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3),
                              keras.layers.BatchNormalization(renorm=True)])
    model.layers[1].set_weights(random_weights((None, 3), 3, renorm=True))
    converted = cbn.keras.convert(model)
    assert converted.layers[1].renorm
    for a, b in zip(model.get_weights(), converted.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"renorm": True, "renorm_clipping": {"rmax": 2.0, "max": 1.0}}, ValueError, "unknown keys"),
    ({"renorm": True, "renorm_clipping": {"rmax": 0.5, "rmin": 1.0}}, ValueError, "rmax >= rmin"),
    ({"renorm": True, "renorm_clipping": {"dmax": -1.0}}, ValueError, "dmax >= 0"),
    ({"renorm": True, "renorm_clipping": [1.0]}, TypeError, "renorm_clipping must be a dict"),
    ({"renorm": "yes"}, TypeError, "renorm must be a bool"),
    ({"virtual_batch_size": 0}, ValueError, "positive int"),
    ({"virtual_batch_size": 2.5}, ValueError, "positive int"),
    ({"virtual_batch_size": 2, "adjustment": lambda shape: (1.0, 0.0)}, ValueError,
     "cannot be combined"),
])
def test_bad_new_arguments_raise_naming_cbn(kwargs, error, message):
    with pytest.raises(error, match=f"cbn.keras.BatchNormalization: .*{message}"):
        cbn.keras.BatchNormalization(**kwargs)


def test_bad_ghost_batches_raise_naming_cbn():
    layer = cbn.keras.BatchNormalization(virtual_batch_size=3)
    x = RNG.normal(size=(8, 2)).astype("float32")
    with pytest.raises(ValueError, match="cbn.keras.BatchNormalization: virtual_batch_size=3"):
        layer(x, training=True)
    np.testing.assert_array_equal(layer.moving_mean, np.zeros(2))  # state untouched
    assert keras.ops.convert_to_numpy(layer(x, training=False)).shape == x.shape
    with pytest.raises(ValueError, match="cbn.keras.BatchNormalization: axis=0"):
        cbn.keras.BatchNormalization(axis=0, virtual_batch_size=2).build((4, 3))


def test_fold_merges_bn_after_dense_and_conv_and_keeps_predictions():
    # Issue 24 item 4: folding against the unfolded model on this backend.
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)  # foldable
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(5, 3, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)  # after an activation: kept
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(7)(x)
    outputs = cbn.keras.BatchNormalization(epsilon=1e-2)(x)  # cbn's, foldable
    model = keras.Model(inputs, outputs)
    for layer in model.layers:
        if isinstance(layer, (keras.layers.BatchNormalization, cbn.keras.BatchNormalization)):
            channels = layer.moving_mean.shape[0]
            layer.set_weights(random_weights(None, channels))
    data = RNG.normal(size=(3, 6, 6, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(data, training=False))
    folded = cbn.keras.fold(model)
    got = keras.ops.convert_to_numpy(folded(data, training=False))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    kinds = [type(layer).__name__ for layer in folded.layers]
    assert kinds.count("Folded") == 2 and kinds.count("BatchNormalization") == 1
    with pytest.raises(TypeError, match="keras.Model"):
        cbn.keras.fold("model")
