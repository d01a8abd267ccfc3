"""cbn.keras on every Keras backend. Keras reads KERAS_BACKEND once, at import, so each
backend's checks (tests/keras_checks.py, tests/keras_training_checks.py, and on TensorFlow
tests/keras_sync_checks.py) run in their own pytest process; this test fails with that
process's report if any check fails."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Found, not imported: this process must not pick a Keras backend.
if importlib.util.find_spec("keras") is None:
    pytest.skip("needs the [keras] extra", allow_module_level=True)

HERE = Path(__file__).parent
# Keras' numpy backend has no gradients: it runs the layer, not the training checks.
CHECKS = {backend: [HERE / "keras_checks.py", HERE / "keras_training_checks.py"]
          for backend in ("jax", "tensorflow", "torch")}
CHECKS["numpy"] = [HERE / "keras_checks.py"]
# synchronized=True is TensorFlow's; its checks come first, to configure the logical
# devices of their MirroredStrategy before TensorFlow starts.
CHECKS["tensorflow"].insert(0, HERE / "keras_sync_checks.py")


@pytest.mark.parametrize("backend", list(CHECKS))
def test_cbn_keras_checks_pass_on_backend(backend, tmp_path):
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path}", *map(str, CHECKS[backend])],
        env=env, capture_output=True, text=True, timeout=900,
    )
    report = run.stdout[-6000:] + run.stderr[-3000:]
    assert run.returncode == 0, f"KERAS_BACKEND={backend}:\n{report}"
    if backend != "numpy":
        assert "digits test accuracy" in run.stdout, report


def test_fit_step_benchmark_runs():
    """bench/keras_fit.py, tiny: the table it prints has a row per backend, none failed."""
    run = subprocess.run(
        [sys.executable, str(HERE.parent / "bench" / "keras_fit.py"), "--backends", "jax",
         "--shape", "4", "8", "8", "1", "--steps", "1", "--repeats", "1", "--warmup", "1"],
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, capture_output=True, text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| jax |")]
    assert len(rows) == 1 and "failed" not in rows[0], run.stdout


def test_import_without_keras_names_the_extra():
    code = ("import sys; sys.modules['keras'] = None\n"
            "try:\n    import cbn.keras\nexcept ImportError as err:\n    print(err)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert 'pip install "cbn[keras]"' in run.stdout, run.stdout + run.stderr
