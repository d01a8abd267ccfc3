"""cbn.keras on every Keras backend. Keras reads KERAS_BACKEND once, at import, so each
backend's checks (tests/keras_checks.py, tests/keras_training_checks.py) run in their own
pytest process; this test fails with that process's report if any check fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("keras")

HERE = Path(__file__).parent
CHECKS = [HERE / "keras_checks.py", HERE / "keras_training_checks.py"]


@pytest.mark.parametrize("backend", ["jax", "tensorflow", "torch", "numpy"])
def test_cbn_keras_checks_pass_on_backend(backend, tmp_path):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-rs",
         f"--basetemp={tmp_path}", *map(str, CHECKS)],
        env=env, capture_output=True, text=True, timeout=900,
    )
    report = run.stdout[-6000:] + run.stderr[-3000:]
    assert run.returncode == 0, f"KERAS_BACKEND={backend}:\n{report}"
    if backend != "numpy":
        assert "digits test accuracy" in run.stdout, report
