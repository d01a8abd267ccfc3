"""State helpers of the layer tests: known weights for a built layer, the weights as float64,
and the float32 tolerance the layer's results are held to against the float64 reference."""

from __future__ import annotations

import numpy as np

#: float32 results against the float64 reference
F32_TOL = dict(rtol=2e-6, atol=2e-6)
NAMES4 = ["gamma", "beta", "moving_mean", "moving_variance"]


def rng(seed=0):
    return np.random.default_rng(seed)


def weights_dict(layer, names=NAMES4):
    ws = layer.get_weights()
    return {n: np.asarray(w, dtype=np.float64) for n, w in zip(names, ws, strict=True)}


def set_state(layer, shape, seed=1):
    """Give the layer distinct, known weights; returns them as float64."""
    r = rng(seed)
    layer.build(shape)
    c = shape[-1]
    vals = [
        r.uniform(0.5, 2.0, c),
        r.uniform(-1.0, 1.0, c),
        r.uniform(-0.5, 0.5, c),
        r.uniform(0.5, 3.0, c),
    ]
    layer.set_weights([v.astype(np.float32) for v in vals])
    return {n: v.astype(np.float32).astype(np.float64) for n, v in zip(NAMES4, vals, strict=True)}
