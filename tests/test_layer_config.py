"""Constructor arguments (R1.2, R1.3, R1.6), regularizers and constraints (R9) and serialization
(R10) of cbn.BatchNormalization. The Keras 3 configs below are literal outputs of
keras.layers.BatchNormalization(...).get_config() from Keras 3.15."""

from __future__ import annotations

import cbn
import numpy as np
import pytest

BN = cbn.BatchNormalization

CONFIG_KEYS = [
    "name", "trainable", "dtype", "axis", "momentum", "epsilon", "center", "scale",
    "beta_initializer", "gamma_initializer", "moving_mean_initializer",
    "moving_variance_initializer", "beta_regularizer", "gamma_regularizer", "beta_constraint",
    "gamma_constraint", "synchronized", "renorm", "renorm_clipping", "renorm_momentum",
]


def ser(module, class_name, config=None):
    return {"module": module, "class_name": class_name, "config": config or {},
            "registered_name": None}


def init(class_name, config=None):
    return ser("keras.initializers", class_name, config)


def policy(name):
    return ser("keras", "DTypePolicy", {"name": name})


# ---------------------------------------------------------------- R1.2 initializers


def built(shape=(2, 4000), **kwargs):
    layer = BN(**kwargs)
    layer.build(shape)
    return layer


@pytest.mark.parametrize("name, value", [("zeros", 0.0), ("ones", 1.0), ("constant", 0.0)])
def test_initializer_constant_names_R1_2(name, value):
    layer = built((2, 5), gamma_initializer=name, beta_initializer=name,
                  moving_mean_initializer=name, moving_variance_initializer=name)
    for w in layer.get_weights():
        np.testing.assert_array_equal(w, value)


def test_initializer_random_names_R1_2():
    layer = built(gamma_initializer="random_normal", beta_initializer="random_uniform",
                  moving_mean_initializer="truncated_normal")
    g, b, mm, mv = (np.asarray(w, np.float64) for w in layer.get_weights())
    # Keras defaults: RandomNormal(0, 0.05), RandomUniform(-0.05, 0.05), TruncatedNormal(0, 0.05)
    assert abs(g.mean()) < 0.005 and 0.045 < g.std() < 0.055
    assert b.min() >= -0.05 and b.max() <= 0.05 and b.std() > 0.02
    assert np.abs(mm).max() <= 0.1 + 1e-7 and 0.035 < mm.std() < 0.05
    np.testing.assert_array_equal(mv, 1.0)


@pytest.mark.parametrize("cfg", [
    {"class_name": "Constant", "config": {"value": 4.0}},
    init("Constant", {"value": 4.0}),
])
def test_initializer_from_config_dict_R1_2(cfg):
    layer = built((2, 3), gamma_initializer=cfg, moving_variance_initializer=dict(cfg))
    np.testing.assert_array_equal(layer.gamma, 4.0)
    np.testing.assert_array_equal(layer.moving_variance, 4.0)
    np.testing.assert_array_equal(layer.beta, 0.0)


def test_initializer_callables_R1_2():
    calls = []

    def f(shape, dtype=None):
        calls.append(tuple(shape))
        return np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) + 0.5

    class KerasLikeInit:
        def __call__(self, shape, dtype=None):
            return np.full(shape, -2.0)

    layer = built((2, 3, 4, 5), axis=[1, 3], beta_initializer=f,
                  moving_mean_initializer=KerasLikeInit())
    assert calls == [(3, 5)]
    np.testing.assert_array_equal(layer.beta, np.arange(15).reshape(3, 5) + 0.5)
    np.testing.assert_array_equal(layer.moving_mean, -2.0)
    assert layer.beta.dtype == np.float32


# ---------------------------------------------------------------- R9.1 regularizers -> losses


def with_weights(shape, gamma, beta, **kwargs):
    layer = BN(**kwargs)
    layer.build(shape)
    c = shape[-1]
    ws = []
    if layer.gamma is not None:
        ws.append(np.float32(gamma))
    if layer.beta is not None:
        ws.append(np.float32(beta))
    ws += [np.float32([-5.0] * c), np.float32([100.0] * c)]
    layer.set_weights(ws)
    return layer


G = [1.0, -2.0, 3.0]
B = [0.5, -0.5, 4.0]


@pytest.mark.parametrize("reg, fn", [
    ("l2", lambda w: 0.01 * np.sum(np.square(w))),
    ("l1", lambda w: 0.01 * np.sum(np.abs(w))),
    ("l1_l2", lambda w: 0.01 * np.sum(np.abs(w)) + 0.01 * np.sum(np.square(w))),
    ({"class_name": "L2", "config": {"l2": 0.5}}, lambda w: 0.5 * np.sum(np.square(w))),
    (ser("keras.regularizers", "L1L2", {"l1": 0.1, "l2": 0.2}),
     lambda w: 0.1 * np.sum(np.abs(w)) + 0.2 * np.sum(np.square(w))),
    (ser("keras.regularizers", "L1", {"l1": 0.25}), lambda w: 0.25 * np.sum(np.abs(w))),
    (lambda w: 3.0 * float(np.sum(w)), lambda w: 3.0 * np.sum(w)),
])
def test_regularizer_losses_values_gamma_first_R9_1(reg, fn):
    layer = with_weights((2, 3), G, B, gamma_regularizer=reg, beta_regularizer=reg)
    losses = [float(v) for v in layer.losses]
    assert losses == pytest.approx([fn(np.array(G)), fn(np.array(B))], rel=1e-6)


def test_losses_hand_computed_R9_1():
    layer = with_weights((2, 3), G, B, gamma_regularizer="l2", beta_regularizer="l1")
    # gamma: 0.01 * (1 + 4 + 9) = 0.14 ; beta: 0.01 * (0.5 + 0.5 + 4) = 0.05
    assert [float(v) for v in layer.losses] == pytest.approx([0.14, 0.05], rel=1e-6)


def test_losses_only_for_regularized_weights_R9_1():
    layer = with_weights((2, 3), G, B, beta_regularizer="l2")
    assert [float(v) for v in layer.losses] == pytest.approx([0.01 * (0.25 + 0.25 + 16)])
    layer = with_weights((2, 3), G, B, gamma_regularizer="l1")
    assert [float(v) for v in layer.losses] == pytest.approx([0.06])
    layer = with_weights((2, 3), G, B)
    assert list(layer.losses) == []
    layer = with_weights((2, 3), G, B, scale=False, gamma_regularizer="l2", beta_regularizer="l1")
    assert [float(v) for v in layer.losses] == pytest.approx([0.05])


def test_losses_computed_at_access_R9_1():
    layer = with_weights((2, 3), G, B, gamma_regularizer="l2")
    assert float(layer.losses[0]) == pytest.approx(0.14)
    layer.set_weights([np.float32([2, 2, 2]), np.float32(B), np.float32([0, 0, 0]),
                       np.float32([1, 1, 1])])
    assert float(layer.losses[0]) == pytest.approx(0.12)
    # moving statistics never regularized; training calls do not change gamma
    layer(np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32), training=True)
    assert [float(v) for v in layer.losses] == pytest.approx([0.12])


def test_losses_dropped_when_not_trainable_R3_2_R9_1():
    layer = with_weights((2, 3), G, B, gamma_regularizer="l2", beta_regularizer="l2")
    layer.trainable = False
    assert list(layer.losses) == []
    layer.trainable = True
    assert len(layer.losses) == 2


# ---------------------------------------------------------------- R9.2 constraints


@pytest.mark.parametrize("con, expected", [
    ("non_neg", [3.0, 0.0]),
    ("unit_norm", [0.6, -0.8]),
    ("max_norm", [1.2, -1.6]),          # default max 2: w * 2 / ||w||
    ("min_max_norm", [0.6, -0.8]),      # default [0, 1]
    ({"class_name": "MaxNorm", "config": {"max_value": 1.0, "axis": 0}}, [0.6, -0.8]),
    (ser("keras.constraints", "NonNeg"), [3.0, 0.0]),
    (lambda w: np.clip(w, -0.5, 0.5), [0.5, -0.5]),
])
def test_constraints_applied_by_apply_constraints_R9_2(con, expected):
    layer = BN(gamma_constraint=con, beta_constraint=con)
    layer.build((4, 2))
    mm, mv = np.float32([-3.0, 4.0]), np.float32([30.0, 40.0])
    layer.set_weights([np.float32([3.0, -4.0]), np.float32([3.0, -4.0]), mm, mv])
    layer.apply_constraints()
    g, b, mm2, mv2 = layer.get_weights()
    np.testing.assert_allclose(g, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b, expected, rtol=1e-6, atol=1e-7)
    # never applied to moving statistics
    np.testing.assert_array_equal(mm2, mm)
    np.testing.assert_array_equal(mv2, mv)
    np.testing.assert_allclose(layer.gamma, expected, rtol=1e-6, atol=1e-7)


def test_constraint_only_on_its_weight_R9_2():
    layer = BN(beta_constraint="non_neg")
    layer.build((4, 2))
    layer.set_weights([np.float32([-1.0, 2.0]), np.float32([-1.0, 2.0]), np.float32([-1.0, -2.0]),
                       np.float32([1.0, 1.0])])
    layer.apply_constraints()
    g, b, mm, _ = layer.get_weights()
    np.testing.assert_array_equal(g, [-1.0, 2.0])
    np.testing.assert_array_equal(b, [0.0, 2.0])
    np.testing.assert_array_equal(mm, [-1.0, -2.0])


def test_apply_constraints_without_constraints_is_noop_R9_2():
    layer = BN()
    layer.build((4, 2))
    ws = [np.float32([-1.0, 2.0]), np.float32([-3.0, 4.0]), np.float32([-5.0, 6.0]),
          np.float32([7.0, 8.0])]
    layer.set_weights(ws)
    layer.apply_constraints()
    for a, b in zip(layer.get_weights(), ws, strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- R10.1 get_config


def default_config(name="bn", dtype="float32"):
    return {
        "name": name,
        "trainable": True,
        "dtype": policy(dtype),
        "axis": -1,
        "momentum": 0.99,
        "epsilon": 0.001,
        "center": True,
        "scale": True,
        "beta_initializer": init("Zeros"),
        "gamma_initializer": init("Ones"),
        "moving_mean_initializer": init("Zeros"),
        "moving_variance_initializer": init("Ones"),
        "beta_regularizer": None,
        "gamma_regularizer": None,
        "beta_constraint": None,
        "gamma_constraint": None,
        "synchronized": False,
        "renorm": False,
        "renorm_clipping": None,
        "renorm_momentum": 0.99,
    }


def test_default_config_exact_R10_1():
    cfg = BN(name="bn").get_config()
    assert list(cfg) == CONFIG_KEYS
    assert cfg == default_config()


@pytest.mark.parametrize("dtype, name", [(None, "float32"), ("float32", "float32"),
                                         ("float64", "float64"), ("float16", "float16"),
                                         ("mixed_float16", "mixed_float16"),
                                         ("mixed_bfloat16", "mixed_bfloat16")])
def test_dtype_written_as_dtype_policy_R10_1(dtype, name):
    assert BN(dtype=dtype).get_config()["dtype"] == policy(name)


@pytest.mark.parametrize("arg, value, expected", [
    ("beta_initializer", "random_normal",
     init("RandomNormal", {"seed": None, "mean": 0.0, "stddev": 0.05})),
    ("gamma_initializer", "random_uniform",
     init("RandomUniform", {"seed": None, "minval": -0.05, "maxval": 0.05})),
    ("moving_mean_initializer", "truncated_normal",
     init("TruncatedNormal", {"seed": None, "mean": 0.0, "stddev": 0.05})),
    ("moving_variance_initializer", "constant", init("Constant", {"value": 0.0})),
    ("gamma_initializer", {"class_name": "Constant", "config": {"value": 4.0}},
     init("Constant", {"value": 4.0})),
    ("beta_initializer", "zeros", init("Zeros")),
    ("gamma_regularizer", "l2", ser("keras.regularizers", "L2", {"l2": 0.01})),
    ("beta_regularizer", "l1_l2", ser("keras.regularizers", "L1L2", {"l1": 0.01, "l2": 0.01})),
    ("beta_regularizer", {"class_name": "L1L2", "config": {"l1": 0.1, "l2": 0.2}},
     ser("keras.regularizers", "L1L2", {"l1": 0.1, "l2": 0.2})),
    ("gamma_constraint", "non_neg", ser("keras.constraints", "NonNeg")),
    ("gamma_constraint", "unit_norm", ser("keras.constraints", "UnitNorm", {"axis": 0})),
    ("beta_constraint", "max_norm", ser("keras.constraints", "MaxNorm",
                                        {"max_value": 2, "axis": 0})),
    ("beta_constraint", "min_max_norm",
     ser("keras.constraints", "MinMaxNorm",
         {"min_value": 0.0, "max_value": 1.0, "rate": 1.0, "axis": 0})),
])
def test_objects_serialize_in_keras_format_R10_1(arg, value, expected):
    cfg = BN(**{arg: value}).get_config()
    assert list(cfg) == CONFIG_KEYS
    assert cfg[arg] == expected
    assert BN.from_config(cfg).get_config() == cfg  # R10.2


def test_l1_string_serializes_as_l1_001_R10_1():
    got = BN(gamma_regularizer="l1").get_config()["gamma_regularizer"]
    assert set(got) == {"module", "class_name", "config", "registered_name"}
    assert got["module"] == "keras.regularizers" and got["class_name"] == "L1"
    assert got["registered_name"] is None
    # Keras writes float32(0.01) = 0.009999999776482582; either spelling of 0.01 is fine
    assert got["config"]["l1"] == pytest.approx(0.01, rel=1e-7)


def test_virtual_batch_size_key_appended_last_R10_1():
    cfg = BN(virtual_batch_size=4).get_config()
    assert list(cfg) == CONFIG_KEYS + ["virtual_batch_size"]
    assert cfg["virtual_batch_size"] == 4
    back = BN.from_config(cfg).get_config()
    assert back == cfg and list(back) == list(cfg)


@pytest.mark.parametrize("fused", [None, True, False])
def test_fused_not_serialized_R1_5_R10_1(fused):
    cfg = BN(name="bn", fused=fused).get_config()
    assert list(cfg) == CONFIG_KEYS
    assert cfg == default_config()


def test_allreduce_not_serialized_R10_1():
    cfg = BN(name="bn", allreduce=lambda buf: buf).get_config()
    assert list(cfg) == CONFIG_KEYS
    assert cfg == default_config()


def test_adjustment_not_serialized_R10_1():
    def adj(shape):
        return np.ones(shape[-1:]), np.zeros(shape[-1:])

    cfg = BN(name="bn", adjustment=adj).get_config()
    assert list(cfg) == CONFIG_KEYS
    assert cfg == default_config()


def test_synchronized_serialized_R10_1():
    cfg = BN(name="bn", synchronized=True, allreduce=lambda buf: buf).get_config()
    assert list(cfg) == CONFIG_KEYS
    assert cfg["synchronized"] is True
    assert BN.from_config(cfg).get_config() == cfg


def test_non_default_values_serialized_R10_1():
    cfg = BN(name="my_bn", axis=1, momentum=0.9, epsilon=1e-5, center=False, scale=True,
             trainable=False, renorm=True, renorm_clipping={"rmax": 3.0, "rmin": 0.3, "dmax": 5.0},
             renorm_momentum=0.8).get_config()
    assert list(cfg) == CONFIG_KEYS
    exp = default_config("my_bn")
    exp.update(trainable=False, axis=1, momentum=0.9, epsilon=1e-5, center=False, renorm=True,
               renorm_clipping={"rmax": 3.0, "rmin": 0.3, "dmax": 5.0}, renorm_momentum=0.8)
    assert cfg == exp


# ---------------------------------------------------------------- R10.2 from_config


@pytest.mark.parametrize("kwargs", [
    {},
    {"axis": [1, 3], "momentum": 0.5},
    {"axis": (1, 2)},
    {"center": False, "gamma_regularizer": "l1", "beta_constraint": "non_neg"},
    {"scale": False, "beta_regularizer": "l1_l2", "gamma_constraint": "unit_norm"},
    {"dtype": "mixed_bfloat16", "epsilon": 0.1},
    {"trainable": False, "dtype": "float64"},
    {"renorm": True, "renorm_clipping": {"rmax": 2.0}, "renorm_momentum": 0.5},
    {"virtual_batch_size": 2, "moving_variance_initializer": "random_uniform"},
])
def test_round_trip_reproduces_config_R10_2(kwargs):
    cfg = BN(name="rt", **kwargs).get_config()
    back = BN.from_config(cfg)
    cfg2 = back.get_config()
    assert cfg2 == cfg
    assert list(cfg2) == list(cfg)
    assert back.trainable is cfg["trainable"]


def test_from_config_accepts_plain_dtype_string_R10_1():
    cfg = default_config()
    cfg["dtype"] = "float64"
    layer = BN.from_config(cfg)
    layer.build((2, 3))
    assert layer.moving_mean.dtype == np.float64
    assert layer.get_config()["dtype"] == policy("float64")
    y = np.asarray(layer(np.ones((2, 3))))
    assert y.dtype == np.float64


# Literal outputs of Keras 3.15 keras.layers.BatchNormalization(...).get_config()
KERAS3_DEFAULT = {
    "name": "batch_normalization",
    "trainable": True,
    "dtype": {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"},
              "registered_name": None},
    "axis": -1,
    "momentum": 0.99,
    "epsilon": 0.001,
    "center": True,
    "scale": True,
    "beta_initializer": {"module": "keras.initializers", "class_name": "Zeros", "config": {},
                         "registered_name": None},
    "gamma_initializer": {"module": "keras.initializers", "class_name": "Ones", "config": {},
                          "registered_name": None},
    "moving_mean_initializer": {"module": "keras.initializers", "class_name": "Zeros",
                                "config": {}, "registered_name": None},
    "moving_variance_initializer": {"module": "keras.initializers", "class_name": "Ones",
                                    "config": {}, "registered_name": None},
    "beta_regularizer": None,
    "gamma_regularizer": None,
    "beta_constraint": None,
    "gamma_constraint": None,
    "synchronized": False,
    "renorm": False,
    "renorm_clipping": None,
    "renorm_momentum": 0.99,
}

# BatchNormalization(axis=1, momentum=0.9, epsilon=1e-5, center=False,
#     beta_initializer="random_normal", gamma_initializer=Constant(2.0),
#     moving_variance_initializer="random_uniform", gamma_regularizer="l2",
#     beta_regularizer=L1L2(l1=0.1, l2=0.2), gamma_constraint="non_neg",
#     beta_constraint=MaxNorm(2.0), name="bn1", dtype="mixed_float16")
KERAS3_FULL = {
    "name": "bn1",
    "trainable": True,
    "dtype": {"module": "keras", "class_name": "DTypePolicy",
              "config": {"name": "mixed_float16"}, "registered_name": None},
    "axis": 1,
    "momentum": 0.9,
    "epsilon": 1e-05,
    "center": False,
    "scale": True,
    "beta_initializer": {"module": "keras.initializers", "class_name": "RandomNormal",
                         "config": {"seed": None, "mean": 0.0, "stddev": 0.05},
                         "registered_name": None},
    "gamma_initializer": {"module": "keras.initializers", "class_name": "Constant",
                          "config": {"value": 2.0}, "registered_name": None},
    "moving_mean_initializer": {"module": "keras.initializers", "class_name": "Zeros",
                                "config": {}, "registered_name": None},
    "moving_variance_initializer": {"module": "keras.initializers", "class_name": "RandomUniform",
                                    "config": {"seed": None, "minval": -0.05, "maxval": 0.05},
                                    "registered_name": None},
    "beta_regularizer": {"module": "keras.regularizers", "class_name": "L1L2",
                         "config": {"l1": 0.1, "l2": 0.2}, "registered_name": None},
    "gamma_regularizer": {"module": "keras.regularizers", "class_name": "L2",
                          "config": {"l2": 0.01}, "registered_name": None},
    "beta_constraint": {"module": "keras.constraints", "class_name": "MaxNorm",
                        "config": {"max_value": 2.0, "axis": 0}, "registered_name": None},
    "gamma_constraint": {"module": "keras.constraints", "class_name": "NonNeg", "config": {},
                         "registered_name": None},
    "synchronized": False,
    "renorm": False,
    "renorm_clipping": None,
    "renorm_momentum": 0.99,
}

# BatchNormalization(renorm=True, renorm_clipping={"rmax": 3.0, "rmin": 0.3, "dmax": 5.0},
#     renorm_momentum=0.9, gamma_constraint="unit_norm", beta_regularizer="l1", dtype="float64")
KERAS3_RENORM = {
    "name": "batch_normalization_1",
    "trainable": True,
    "dtype": {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float64"},
              "registered_name": None},
    "axis": -1,
    "momentum": 0.99,
    "epsilon": 0.001,
    "center": True,
    "scale": True,
    "beta_initializer": {"module": "keras.initializers", "class_name": "Zeros", "config": {},
                         "registered_name": None},
    "gamma_initializer": {"module": "keras.initializers", "class_name": "Ones", "config": {},
                          "registered_name": None},
    "moving_mean_initializer": {"module": "keras.initializers", "class_name": "Zeros",
                                "config": {}, "registered_name": None},
    "moving_variance_initializer": {"module": "keras.initializers", "class_name": "Ones",
                                    "config": {}, "registered_name": None},
    "beta_regularizer": {"module": "keras.regularizers", "class_name": "L1",
                         "config": {"l1": 0.009999999776482582}, "registered_name": None},
    "gamma_regularizer": None,
    "beta_constraint": None,
    "gamma_constraint": {"module": "keras.constraints", "class_name": "UnitNorm",
                         "config": {"axis": 0}, "registered_name": None},
    "synchronized": False,
    "renorm": True,
    "renorm_clipping": {"rmax": 3.0, "rmin": 0.3, "dmax": 5.0},
    "renorm_momentum": 0.9,
}

# tf.keras 2 style (TF 2.x SavedModel / H5): axis as a list (set at build), dtype as a plain
# string, legacy initializer dicts, no "synchronized" key, renorm keys only because renorm is on.
TF_KERAS2_RENORM = {
    "name": "batch_normalization_3",
    "trainable": True,
    "dtype": "float32",
    "axis": [3],
    "momentum": 0.9,
    "epsilon": 1e-05,
    "center": True,
    "scale": True,
    "beta_initializer": {"class_name": "Zeros", "config": {}},
    "gamma_initializer": {"class_name": "Ones", "config": {}},
    "moving_mean_initializer": {"class_name": "Zeros", "config": {}},
    "moving_variance_initializer": {"class_name": "Ones", "config": {}},
    "beta_regularizer": None,
    "gamma_regularizer": {"class_name": "L2", "config": {"l2": 9.999999747378752e-05}},
    "beta_constraint": None,
    "gamma_constraint": None,
    "renorm": True,
    "renorm_clipping": {"rmax": 3.0, "rmin": 0.3333, "dmax": 5.0},
    "renorm_momentum": 0.99,
}

TF_KERAS2_PLAIN = {
    "name": "batch_normalization",
    "trainable": True,
    "dtype": "float32",
    "axis": [1],
    "momentum": 0.99,
    "epsilon": 0.001,
    "center": True,
    "scale": True,
    "beta_initializer": {"class_name": "Zeros", "config": {}},
    "gamma_initializer": {"class_name": "Ones", "config": {}},
    "moving_mean_initializer": {"class_name": "Zeros", "config": {}},
    "moving_variance_initializer": {"class_name": "Ones", "config": {}},
    "beta_regularizer": None,
    "gamma_regularizer": None,
    "beta_constraint": None,
    "gamma_constraint": None,
}


@pytest.mark.parametrize("cfg", [KERAS3_DEFAULT, KERAS3_FULL, KERAS3_RENORM])
def test_from_keras3_config_reproduces_it_R10_2(cfg):
    layer = BN.from_config(dict(cfg))
    got = layer.get_config()
    assert list(got) == CONFIG_KEYS
    assert got == cfg


def test_from_keras3_full_config_behaviour_R10_2():
    layer = BN.from_config(dict(KERAS3_FULL))
    assert layer.trainable is True
    layer.build((4, 3, 5))  # axis=1 -> C=3
    ws = layer.get_weights()
    assert len(ws) == 3  # center=False: gamma, moving_mean, moving_variance
    g, mm, mv = ws
    assert g.shape == (3,) and g.dtype == np.float32  # mixed_float16: float32 weights (R7.2)
    np.testing.assert_array_equal(g, 2.0)
    np.testing.assert_array_equal(mm, 0.0)
    assert np.abs(mv).max() <= 0.05
    assert [float(v) for v in layer.losses] == pytest.approx([0.01 * 4 * 3])
    x = np.random.default_rng(0).normal(1.0, 2.0, (4, 3, 5)).astype(np.float32)
    y = np.asarray(layer(x, training=True))
    assert y.dtype == np.float16
    xr = x.astype(np.float16).astype(np.float64)
    mu = xr.mean(axis=(0, 2), keepdims=True)
    var = xr.var(axis=(0, 2), keepdims=True)
    ref = (xr - mu) * 2.0 / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(y.astype(np.float64), ref, rtol=2**-10, atol=2**-9)
    np.testing.assert_allclose(layer.moving_mean, 0.1 * mu.ravel(), rtol=1e-5, atol=1e-6)


def test_from_keras3_renorm_config_behaviour_R10_2():
    layer = BN.from_config(dict(KERAS3_RENORM))
    layer.build((4, 2))
    ws = layer.get_weights()
    assert len(ws) == 7 and all(w.dtype == np.float64 for w in ws)
    layer.set_weights([np.float64([-3.0, 4.0]), np.float64([-1.0, 2.0])] + ws[2:])
    layer.apply_constraints()
    np.testing.assert_allclose(layer.gamma, [-0.6, 0.8], rtol=1e-6)
    assert [float(v) for v in layer.losses] == pytest.approx([0.03], rel=1e-6)


def test_from_tf_keras2_renorm_config_R10_2():
    layer = BN.from_config(dict(TF_KERAS2_RENORM))
    cfg = layer.get_config()
    assert list(cfg) == CONFIG_KEYS
    assert cfg["name"] == "batch_normalization_3"
    assert cfg["dtype"] == policy("float32")
    assert cfg["axis"] in (3, [3], (3,))
    assert cfg["momentum"] == 0.9 and cfg["epsilon"] == 1e-5
    assert cfg["synchronized"] is False
    assert cfg["renorm"] is True
    assert cfg["renorm_clipping"] == {"rmax": 3.0, "rmin": 0.3333, "dmax": 5.0}
    assert cfg["renorm_momentum"] == 0.99
    assert cfg["beta_initializer"] == init("Zeros")
    assert cfg["gamma_regularizer"]["class_name"] == "L2"
    assert cfg["gamma_regularizer"]["config"]["l2"] == pytest.approx(1e-4)
    layer.build((2, 4, 4, 5))
    ws = layer.get_weights()
    assert len(ws) == 7 and all(w.shape == (5,) for w in ws)
    assert [float(v) for v in layer.losses] == pytest.approx([5e-4], rel=1e-6)
    # the reloaded config round-trips (R10.2)
    assert BN.from_config(cfg).get_config() == cfg


def test_from_tf_keras2_plain_config_R10_2():
    layer = BN.from_config(dict(TF_KERAS2_PLAIN))
    cfg = layer.get_config()
    assert list(cfg) == CONFIG_KEYS
    assert cfg["axis"] in (1, [1], (1,))
    assert cfg["renorm"] is False and cfg["synchronized"] is False
    x = np.random.default_rng(1).normal(3.0, 2.0, (4, 3, 6)).astype(np.float32)
    y = np.asarray(layer(x, training=True), np.float64)
    x64 = x.astype(np.float64)
    mu, var = x64.mean(axis=(0, 2), keepdims=True), x64.var(axis=(0, 2), keepdims=True)
    np.testing.assert_allclose(y, (x64 - mu) / np.sqrt(var + 1e-3), rtol=2e-6, atol=2e-6)
    assert layer.moving_mean.shape == (3,)
