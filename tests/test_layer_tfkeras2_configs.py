"""tf.keras 2 configs and weight shapes in cbn.BatchNormalization (behaviour.md R10.2, R2.2):
literal outputs of tf_keras 2.21 ``BatchNormalization.get_config()`` (ghost, renorm, multi-axis)
load, round-trip and train as the float64 reference of tfkeras2_reference.py says."""

from __future__ import annotations

import re

import cbn
import numpy as np
import pytest
from reference import assert_unchanged, normalize, snapshot
from tfkeras2_reference import NAMES, assert_output, assert_state, batches, reference_step

BN = cbn.BatchNormalization


# ---------------------------------------------------------------- R10.2 / R2.2 tf.keras 2 configs

# tf_keras 2.21: BatchNormalization(axis=1, virtual_batch_size=2, momentum=0.9, name="ghost_bn")
# built by a training call on a (4, 3, 5) input. tf.keras 2 shifts a ghost layer's axes by one
# at build (they index its (V, B/V, ...) view) and writes them so: "axis": [2].
TF_KERAS2_GHOST_NCW = {
    "name": "ghost_bn", "trainable": True, "dtype": "float32", "axis": [2], "momentum": 0.9,
    "epsilon": 0.001, "center": True, "scale": True,
    "beta_initializer": {"module": "keras.initializers", "class_name": "Zeros", "config": {},
                         "registered_name": None},
    "gamma_initializer": {"module": "keras.initializers", "class_name": "Ones", "config": {},
                          "registered_name": None},
    "moving_mean_initializer": {"module": "keras.initializers", "class_name": "Zeros",
                                "config": {}, "registered_name": None},
    "moving_variance_initializer": {"module": "keras.initializers", "class_name": "Ones",
                                    "config": {}, "registered_name": None},
    "beta_regularizer": None, "gamma_regularizer": None, "beta_constraint": None,
    "gamma_constraint": None, "virtual_batch_size": 2,
}

# tf_keras 2.21: BatchNormalization(virtual_batch_size=2, renorm=True,
#     renorm_clipping={"rmax": 2.0}, name="ghost_renorm", dtype="mixed_float16"), built on (4, 3).
TF_KERAS2_GHOST_RENORM_MIXED = {
    "name": "ghost_renorm", "trainable": True,
    "dtype": {"module": "keras.mixed_precision", "class_name": "Policy",
              "config": {"name": "mixed_float16"}, "registered_name": None},
    "axis": [2], "momentum": 0.99, "epsilon": 0.001, "center": True, "scale": True,
    "beta_initializer": {"module": "keras.initializers", "class_name": "Zeros", "config": {},
                         "registered_name": None},
    "gamma_initializer": {"module": "keras.initializers", "class_name": "Ones", "config": {},
                          "registered_name": None},
    "moving_mean_initializer": {"module": "keras.initializers", "class_name": "Zeros",
                                "config": {}, "registered_name": None},
    "moving_variance_initializer": {"module": "keras.initializers", "class_name": "Ones",
                                    "config": {}, "registered_name": None},
    "beta_regularizer": None, "gamma_regularizer": None, "beta_constraint": None,
    "gamma_constraint": None, "renorm": True, "renorm_clipping": {"rmax": 2.0},
    "renorm_momentum": 0.99, "virtual_batch_size": 2,
}

# tf_keras 2.21: BatchNormalization(axis=[1, 3], name="multi") built on (4, 3, 5, 2); its
# weights have the broadcast shape (1, 3, 1, 2).
TF_KERAS2_MULTI_AXIS = {
    "name": "multi", "trainable": True, "dtype": "float32", "axis": [1, 3], "momentum": 0.99,
    "epsilon": 0.001, "center": True, "scale": True,
    "beta_initializer": {"module": "keras.initializers", "class_name": "Zeros", "config": {},
                         "registered_name": None},
    "gamma_initializer": {"module": "keras.initializers", "class_name": "Ones", "config": {},
                          "registered_name": None},
    "moving_mean_initializer": {"module": "keras.initializers", "class_name": "Zeros",
                                "config": {}, "registered_name": None},
    "moving_variance_initializer": {"module": "keras.initializers", "class_name": "Ones",
                                    "config": {}, "registered_name": None},
    "beta_regularizer": None, "gamma_regularizer": None, "beta_constraint": None,
    "gamma_constraint": None,
}


def tf_keras2_weights(shape, count, seed):
    """Distinct weights in a tf.keras 2 broadcast shape; variances kept positive."""
    r = np.random.default_rng(seed)
    ws = [r.uniform(-1.0, 1.0, shape).astype(np.float32) for _ in range(count)]
    ws[3] = np.abs(ws[3]) + 0.5
    if count == 7:  # moving_stddev and renorm_stddev positive too
        ws[4], ws[6] = np.abs(ws[4]) + 0.5, np.abs(ws[6]) + 0.5
    return ws


def test_from_tf_keras2_built_ghost_config_unshifts_axis_R10_2_R12():
    layer = BN.from_config(dict(TF_KERAS2_GHOST_NCW))
    cfg = layer.get_config()
    assert cfg["axis"] == [1] and cfg["virtual_batch_size"] == 2
    assert cfg["momentum"] == 0.9 and cfg["synchronized"] is False and cfg["renorm"] is False
    # tf.keras 2's weights of this layer have the shape (1, 1, 3, 1) (R2.2: one more leading 1)
    layer.build((4, 3, 5))
    weights = tf_keras2_weights((1, 1, 3, 1), 4, seed=18)
    layer.set_weights(weights)
    ref = {n: w.reshape(3).astype(np.float64) for n, w in zip(NAMES, weights, strict=False)}
    for w, expected in zip(layer.get_weights(), weights, strict=True):
        assert w.shape == (3,)
        np.testing.assert_array_equal(w, expected.reshape(3))
    x = batches(1, (4, 3, 5), seed=19)[0]
    y_ref, ref = reference_step(x, ref, axis=1, virtual_batch_size=2, momentum=0.9)
    assert_output(layer(x, training=True), y_ref)
    assert_state(layer, ref)
    # the config it writes is cbn's, which round-trips unchanged
    assert BN.from_config(layer.get_config()).get_config() == layer.get_config()


def test_from_tf_keras2_ghost_renorm_mixed_config_R10_2_R12():
    layer = BN.from_config(dict(TF_KERAS2_GHOST_RENORM_MIXED))
    cfg = layer.get_config()
    assert cfg["axis"] == [1]  # [2] in tf.keras 2's shifted numbering of a rank-2 input
    assert cfg["renorm"] is True and cfg["renorm_clipping"] == {"rmax": 2.0}
    assert cfg["dtype"]["config"]["name"] == "mixed_float16"
    layer.build((4, 3))
    weights = tf_keras2_weights((1, 1, 3), 7, seed=20)
    layer.set_weights(weights)
    ref = {n: w.reshape(3).astype(np.float64) for n, w in zip(NAMES, weights, strict=True)}
    x = batches(1, (4, 3), seed=21)[0]
    y = layer(x, training=True)
    assert y.dtype == np.float16
    y_ref, ref = reference_step(x.astype(np.float16), ref, virtual_batch_size=2, renorm=True,
                                clipping={"rmax": 2.0})
    np.testing.assert_allclose(y.astype(np.float64), y_ref, rtol=2**-10, atol=2**-10)
    assert_state(layer, ref)


@pytest.mark.parametrize("axis, expected", [
    (-1, -1),          # unbuilt tf.keras 2 layer: the user's int
    ([1], [1]),        # an axis 1 was never shifted (shifted axes are >= 2)
    ([-1], [-1]),
])
def test_tf_keras2_ghost_configs_with_unshifted_axes_kept_R10_2(axis, expected):
    cfg = dict(TF_KERAS2_GHOST_NCW, axis=axis)
    assert BN.from_config(cfg).get_config()["axis"] == expected


@pytest.mark.parametrize("axis", [[2], [2, 3], -1, 2])
def test_cbn_ghost_configs_round_trip_unchanged_R10_2(axis):
    # cbn (like Keras 3) always writes "synchronized": its own configs are never shifted.
    cfg = BN(axis=axis, virtual_batch_size=2).get_config()
    back = BN.from_config(cfg).get_config()
    assert back == cfg and back["axis"] == axis


def test_from_tf_keras2_multi_axis_config_and_broadcast_weights_R10_2_R2_2():
    layer = BN.from_config(dict(TF_KERAS2_MULTI_AXIS))
    assert layer.get_config()["axis"] == [1, 3]  # no virtual_batch_size: never shifted
    layer.build((4, 3, 5, 2))
    weights = tf_keras2_weights((1, 3, 1, 2), 4, seed=22)
    layer.set_weights(weights)
    for w, expected in zip(layer.get_weights(), weights, strict=True):
        assert w.shape == (3, 2)
        np.testing.assert_array_equal(w, expected.reshape(3, 2))
    ref = {n: w.reshape(3, 2).astype(np.float64) for n, w in zip(NAMES, weights, strict=False)}
    x = batches(1, (4, 3, 5, 2), seed=23)[0]
    y_ref = normalize(x, ref["moving_mean"], ref["moving_variance"], ref["gamma"], ref["beta"],
                      axis=[1, 3])
    assert_output(layer(x), y_ref)
    y_ref, ref = reference_step(x, ref, axis=[1, 3])
    assert_output(layer(x, training=True), y_ref)
    assert_state(layer, ref)


def test_tf_keras2_weight_shape_mismatch_changes_nothing_R2_2():
    layer = BN.from_config(dict(TF_KERAS2_GHOST_NCW))
    layer.build((4, 3, 5))
    before = snapshot(layer)
    with pytest.raises(ValueError, match=re.escape("(1, 1, 5, 1)")):
        layer.set_weights([np.ones((1, 1, 3, 1), np.float32)] * 3
                          + [np.ones((1, 1, 5, 1), np.float32)])
    assert_unchanged(layer, before)
