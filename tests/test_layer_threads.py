"""Concurrency: separate layers trained from several Python threads, and one layer used for
inference from several threads at once, give the serial float64 reference results (behaviour.md
R4-R6; kernels.md "Release the GIL around every kernel")."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import cbn
import numpy as np
from layer_state import NAMES4
from reference import moments, normalize, train_step

BN = cbn.BatchNormalization
SHAPE = (64, 32, 96)  # 196608 elements, ~0.8 MB float32: large enough for the core to run long


def data(seed, shape=SHAPE):
    r = np.random.default_rng(seed)
    return (r.normal(0.0, 1.0, shape) * (1 + seed % 3) + seed).astype(np.float32)


def test_separate_layers_trained_in_threads_match_serial_reference_R4_R5_R6():
    n_layers, n_steps = 6, 3
    axes = [-1, 1, [1, 2], -1, 1, -1]
    xs = [[data(10 * i + k) for k in range(n_steps)] for i in range(n_layers)]
    layers = [BN(axis=axes[i], momentum=0.6) for i in range(n_layers)]

    def work(i):
        outs = []
        for x in xs[i]:
            outs.append(np.asarray(layers[i](x, training=True)))
        outs.append(np.asarray(layers[i](xs[i][0], training=False)))
        return outs

    with ThreadPoolExecutor(max_workers=4) as ex:
        results = list(ex.map(work, range(n_layers)))

    for i in range(n_layers):
        axis = axes[i]
        layer = layers[i]
        cs = tuple(np.asarray(layer.moving_mean).shape)
        state = {"gamma": np.ones(cs), "beta": np.zeros(cs), "moving_mean": np.zeros(cs),
                 "moving_variance": np.ones(cs)}
        for k, x in enumerate(xs[i]):
            y_ref, state, _, _ = train_step(x, state, momentum=0.6, axis=axis)
            np.testing.assert_allclose(results[i][k].astype(np.float64), y_ref, rtol=1e-5,
                                       atol=1e-5)
        ws = layer.get_weights()
        got = {n: np.asarray(w, np.float64) for n, w in zip(NAMES4, ws, strict=True)}
        np.testing.assert_allclose(got["moving_mean"], state["moving_mean"], rtol=1e-6,
                                   atol=1e-6)
        np.testing.assert_allclose(got["moving_variance"], state["moving_variance"], rtol=1e-6)
        y_inf = normalize(xs[i][0], got["moving_mean"], got["moving_variance"], axis=axis)
        np.testing.assert_allclose(results[i][-1].astype(np.float64), y_inf, rtol=1e-5, atol=1e-5)


def test_same_layer_inference_from_many_threads_R3_R6():
    layer = BN(axis=1, momentum=0.0)
    layer(data(99), training=True)  # moving stats := stats of this batch
    mu, var = moments(data(99), 1)
    before = [np.array(w) for w in layer.get_weights()]
    xs = [data(s) for s in range(8)]

    def infer(x):
        return np.asarray(layer(x, training=False))

    with ThreadPoolExecutor(max_workers=4) as ex:
        futures = [ex.submit(infer, x) for x in xs for _ in range(2)]
        outs = [f.result() for f in futures]

    for j, y in enumerate(outs):
        x = xs[j // 2]
        ref = normalize(x, mu, var, axis=1)
        np.testing.assert_allclose(y.astype(np.float64), ref, rtol=1e-5, atol=1e-5)
    # repeated calls on the same input are bit-identical, and nothing was updated
    for j in range(0, len(outs), 2):
        np.testing.assert_array_equal(outs[j], outs[j + 1])
    for a, b in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)


def test_threads_give_same_bits_as_serial_calls_R4():
    xs = [data(50 + s, (128, 48, 40)) for s in range(4)]
    serial = []
    for x in xs:
        layer = BN(momentum=0.5)
        serial.append(np.asarray(layer(x, training=True)).copy())

    def run(x):
        layer = BN(momentum=0.5)
        return np.asarray(layer(x, training=True))

    with ThreadPoolExecutor(max_workers=4) as ex:
        threaded = list(ex.map(run, xs))
    for a, b in zip(serial, threaded, strict=True):
        # same result up to the last bits (the thread count inside the core may differ)
        np.testing.assert_array_max_ulp(a, b, maxulp=2)
