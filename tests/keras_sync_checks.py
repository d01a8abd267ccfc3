"""``synchronized=True`` checks of cbn.keras on the TensorFlow backend: run by
tests/test_keras.py as the first file of the TensorFlow process, since the two logical CPU
devices of the ``tf.distribute.MirroredStrategy`` must be configured before TensorFlow
starts. Oracles: keras.layers.BatchNormalization(synchronized=True) under the same
strategy, and one replica on the concatenated batch."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
if keras.backend.backend() != "tensorflow":
    pytest.skip("synchronized=True is a TensorFlow-backend feature", allow_module_level=True)

import tensorflow as tf  # noqa: E402

tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)

import cbn.keras  # noqa: E402

RNG = np.random.default_rng(13)
STRATEGY = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


def distributed(parts):
    """A per-replica value: replica i gets ``parts[i]`` (sizes may differ)."""
    return STRATEGY.experimental_distribute_values_from_function(
        lambda context: tf.constant(parts[context.replica_id_in_sync_group]))


def replica_step(layer, x_parts, upstream_parts, mask_parts=None):
    """Per replica: (y, dx, dγ, dβ) of sum(layer(x) · upstream), each a list over replicas."""
    @tf.function
    def run(x, upstream, mask):
        def step(x, upstream, mask):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True, mask=mask)
                loss = tf.reduce_sum(y * upstream)
            return (y, *tape.gradient(loss, [x, layer.gamma.value, layer.beta.value]))

        return STRATEGY.run(step, (x, upstream, mask))

    mask = None if mask_parts is None else distributed(mask_parts)
    outputs = run(distributed(x_parts), distributed(upstream_parts), mask)
    return [[t.numpy() for t in STRATEGY.experimental_local_results(o)] for o in outputs]


def built(cls, shape, weights=None, **kwargs):
    with STRATEGY.scope():
        layer = cls(momentum=0.6, **kwargs)
        layer.build(shape)
    if weights is not None:
        layer.set_weights(weights)
    return layer


def random_weights(channels, renorm):
    count = 7 if renorm else 4
    return [RNG.uniform(0.5, 1.5, channels).astype("float32") for _ in range(count)]


def single_replica(shape, weights, x, upstream, mask=None, **kwargs):
    """(dx, dγ, dβ) and the layer, unsynchronized, trained on the whole batch."""
    layer = cbn.keras.BatchNormalization(momentum=0.6, **kwargs)
    layer.build(shape)
    layer.set_weights(weights)
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=True, mask=mask) * upstream)
    grads = tape.gradient(loss, [x, layer.gamma.value, layer.beta.value])
    return grads, layer


@pytest.mark.parametrize("renorm", [False, True])
def test_matches_keras_synchronized_layer_and_the_concatenated_batch(renorm):
    shape = (8, 3, 4)
    weights = random_weights(4, renorm)
    kwargs = {"renorm": renorm, "renorm_clipping": {"rmax": 1.3, "dmax": 0.4}} if renorm else {}
    x = RNG.normal(2.0, 3.0, shape).astype("float32")
    upstream = RNG.normal(size=shape).astype("float32")
    halves = [x[:4], x[4:]], [upstream[:4], upstream[4:]]
    reference = built(keras.layers.BatchNormalization, shape, weights, synchronized=True,
                      **kwargs)
    ours = built(cbn.keras.BatchNormalization, shape, weights, synchronized=True, **kwargs)
    expected, got = replica_step(reference, *halves), replica_step(ours, *halves)
    for e, g in zip(expected, got, strict=True):
        np.testing.assert_allclose(np.concatenate(g), np.concatenate(e), rtol=1e-4, atol=1e-4)
    for a, b in zip(reference.get_weights(), ours.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert_replicas_are_one_batch(got, ours, shape, weights, x, upstream, **kwargs)


def assert_replicas_are_one_batch(got, ours, shape, weights, x, upstream, **kwargs):
    """The replicas' (y, dx, dγ, dβ) and ``ours``' moving statistics equal one replica's on
    the concatenated batch (dγ and dβ summed over the replicas)."""
    (dx, dgamma, dbeta), single = single_replica(shape, weights, x, upstream, **kwargs)
    _, dx_replicas, dgamma_replicas, dbeta_replicas = got
    np.testing.assert_allclose(np.concatenate(dx_replicas), dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sum(dgamma_replicas), dgamma, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(sum(dbeta_replicas), dbeta, rtol=1e-5, atol=1e-5)
    for a, b in zip(single.get_weights(), ours.get_weights(), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_uneven_replica_batches_with_a_mask_are_the_concatenated_batch():
    """Replica batches of 5 and 2 samples, masked: the statistics of the 7 samples' used
    positions, exactly (cbn's merge carries the counts; Keras ignores sync with a mask)."""
    shape = (7, 6, 3)
    weights = random_weights(3, False)
    x = RNG.normal(-1.0, 2.0, shape).astype("float32")
    upstream = RNG.normal(size=shape).astype("float32")
    mask = RNG.random(shape[:-1]) < 0.6
    ours = built(cbn.keras.BatchNormalization, shape, weights, synchronized=True)
    got = replica_step(ours, [x[:5], x[5:]], [upstream[:5], upstream[5:]], [mask[:5], mask[5:]])
    assert_replicas_are_one_batch(got, ours, shape, weights, x, upstream, mask=mask)


def test_without_a_strategy_it_is_the_unsynchronized_layer():
    shape = (6, 4)
    weights = random_weights(4, False)
    layers = []
    for synchronized in (True, False):
        layer = cbn.keras.BatchNormalization(synchronized=synchronized)
        layer.build(shape)
        layer.set_weights(weights)
        layers.append(layer)
    x = RNG.normal(size=shape).astype("float32")
    outputs = [layer(x, training=True).numpy() for layer in layers]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    for a, b in zip(*(layer.get_weights() for layer in layers), strict=True):
        np.testing.assert_array_equal(a, b)


def test_fit_under_mirrored_strategy_matches_keras():
    from keras_checks import fit_alike_and_compare

    x = RNG.normal(3.0, 2.0, (64, 6)).astype("float32")
    y = RNG.normal(size=(64, 2)).astype("float32")
    models = []
    for cls in (keras.layers.BatchNormalization, cbn.keras.BatchNormalization):
        with STRATEGY.scope():
            keras.utils.set_random_seed(3)
            model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8),
                                      cls(momentum=0.8, synchronized=True),
                                      keras.layers.Dense(2)])
            model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        models.append(model)
    fit_alike_and_compare(models, x, y)
