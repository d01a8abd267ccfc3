"""The R package's interchange with this one (r/cbn): JSON files committed under
r/cbn/tests/testthat/fixtures. The Python-written files must equal what
cbn.BatchNormalization writes today (the R tests load them); the R-written
config must load here and reproduce itself. Regenerate the Python files with
``python tests/test_r_interop.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cbn
import numpy as np

FIXTURES = Path(__file__).resolve().parents[1] / "r" / "cbn" / "tests" / "testthat" / "fixtures"


def python_layer() -> cbn.BatchNormalization:
    return cbn.BatchNormalization(
        axis=[1, -1], momentum=0.9, epsilon=0.01, beta_initializer="zeros",
        gamma_initializer={"class_name": "Constant", "config": {"value": 2.0}},
        moving_variance_initializer="ones", name="from_python", dtype="float64")


def python_run() -> dict:
    """One training call with a mask, the gradient of that call, then an inference call."""
    x = np.sin(np.arange(5 * 3 * 2, dtype=np.float64) * 1.7).reshape(5, 3, 2) * 3.0 + 1.0
    mask = (np.arange(15).reshape(5, 3) % 4) != 1
    dy = np.cos(np.arange(30, dtype=np.float64)).reshape(5, 3, 2)
    layer = python_layer()
    y_train = layer(x, training=True, mask=mask)
    dx = layer.backward(dy)
    y_infer = layer(x, training=False)
    return {
        "config": layer.get_config(), "x": x.tolist(), "mask": mask.tolist(), "dy": dy.tolist(),
        "y_train": y_train.tolist(), "dx": dx.tolist(),
        "gradients": [g.tolist() for g in layer.gradients],  # dgamma, dbeta
        "moving_mean": layer.moving_mean.tolist(),
        "moving_variance": layer.moving_variance.tolist(), "y_infer": y_infer.tolist(),
    }


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(u, v) for u, v in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)
    return a == b


def test_python_fixtures_are_what_python_writes():
    run = python_run()
    assert json.loads((FIXTURES / "python_config.json").read_text()) == run["config"]
    assert _close(json.loads((FIXTURES / "python_run.json").read_text()), run)


def test_config_written_by_r_loads_and_round_trips():
    config = json.loads((FIXTURES / "r_config.json").read_text())
    layer = cbn.BatchNormalization.from_config(config)
    assert layer.axis == [1, -1]  # R's axis = c(2, -1)
    assert (layer.momentum, layer.epsilon, layer.center, layer.scale) == (0.9, 0.01, False, True)
    assert layer.name == "from_r"
    assert layer.dtype_policy.name == "float64"
    assert layer.get_config() == config
    x = np.arange(24, dtype=np.float64).reshape(2, 3, 4)
    layer(x)
    np.testing.assert_array_equal(layer.gamma, np.full((3, 4), 3.0))


if __name__ == "__main__":
    FIXTURES.mkdir(parents=True, exist_ok=True)
    run = python_run()
    (FIXTURES / "python_config.json").write_text(json.dumps(run["config"], indent=1) + "\n")
    (FIXTURES / "python_run.json").write_text(json.dumps(run) + "\n")
