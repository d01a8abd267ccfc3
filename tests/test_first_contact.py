"""What a new user meets first: ``python -m cbn --version``/``--help``, the benchmark's
note on a slow result, ``set_weights`` before ``build``, PyTorch tensors that require grad
or are bfloat16, ``import cbn`` without ml_dtypes' import time, and
``examples/train_digits.py --help``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cbn
import numpy as np
import pytest
import torch
from cbn import __main__ as cli

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=True,
                          cwd=ROOT)
    return done.stdout


def test_version_prints_the_package_version():
    assert _run("-m", "cbn", "--version").strip() == f"cbn {cbn.__version__}"


def test_help_has_no_raw_markup_and_names_the_options():
    text = _run("-m", "cbn", "--help")
    assert "``" not in text and "`" not in text
    for option in ("--quick", "--no-bench", "--version"):
        assert option in text


def test_a_slow_benchmark_result_comes_with_its_likely_causes(monkeypatch, capsys):
    # cbn "takes" 5 times NumPy's time on every case: the table is followed by the note.
    monkeypatch.setattr(cli, "median_seconds", lambda *fns: [0.5, 0.1])
    monkeypatch.setattr(cli, "BENCH_SHAPES", [("NC", (8, 4), -1)])
    cli.run_benchmark(quick=False)
    out = capsys.readouterr().out
    assert "0.2x" in out
    note = out.split("Note:")[1]
    for cause in ("busy machine", "OMP_NUM_THREADS=1", f"{cbn.get_num_threads()} OpenMP thread"):
        assert cause in note


def test_a_fast_benchmark_result_has_no_note(monkeypatch, capsys):
    monkeypatch.setattr(cli, "median_seconds", lambda *fns: [0.1, 0.5])
    monkeypatch.setattr(cli, "BENCH_SHAPES", [("NC", (8, 4), -1)])
    cli.run_benchmark(quick=False)
    assert "Note:" not in capsys.readouterr().out


def test_set_weights_before_build_says_to_call_build():
    layer = cbn.BatchNormalization()
    with pytest.raises(ValueError, match=r"not built.*layer\.build\(input_shape\)"):
        layer.set_weights([np.ones(3)] * 4)
    assert not layer.built and layer.weights == []
    layer.build((None, 3))
    layer.set_weights([np.full(3, 2.0, np.float32)] * 4)
    np.testing.assert_array_equal(layer.gamma, [2.0, 2.0, 2.0])


def test_torch_tensor_requiring_grad_says_to_detach():
    t = torch.ones(4, 3, requires_grad=True)
    for call in (lambda: cbn.ops.moments(t),
                 lambda: cbn.ops.batch_norm_train(t),
                 lambda: cbn.ops.batch_normalization(t, np.zeros(3), np.ones(3))):
        with pytest.raises(TypeError, match=r"requires grad.*x\.detach\(\)"):
            call()
    y, mean, var = cbn.ops.batch_norm_train(t.detach())  # what the message says works
    np.testing.assert_array_equal(mean, np.ones(3))


def test_torch_bfloat16_tensors_are_read_and_written_in_place():
    values = np.array([[1.0, 8.0], [3.0, 4.0], [5.0, 0.0]])  # exact in bfloat16
    t = torch.tensor(values, dtype=torch.bfloat16)
    mean, var = cbn.ops.moments(t)
    np.testing.assert_allclose(mean, values.mean(axis=0))
    np.testing.assert_allclose(var, values.var(axis=0))
    cbn.ops.batch_normalization(t, values.mean(axis=0), values.var(axis=0), epsilon=0.0, out=t)
    expected = (values - values.mean(axis=0)) / values.std(axis=0)
    np.testing.assert_allclose(t.float().numpy(), expected, rtol=1e-2)  # bfloat16: 8 bits


def test_import_leaves_ml_dtypes_until_bfloat16_data_or_policy_needs_it():
    # ml_dtypes takes most of a second to import: only bfloat16 data (whose maker
    # imported it) and the mixed_bfloat16 policy need it.
    code = """
import sys
import numpy as np
import cbn
assert "ml_dtypes" not in sys.modules
mean, var = cbn.ops.moments(np.arange(12.0, dtype=np.float32).reshape(4, 3), axis=-1)
assert "ml_dtypes" not in sys.modules
layer = cbn.BatchNormalization(dtype="mixed_bfloat16")
import ml_dtypes
assert layer.compute_dtype == "bfloat16"
x = np.arange(12.0).reshape(4, 3).astype(ml_dtypes.bfloat16)
m, v = cbn.ops.moments(x, axis=-1)
print(m.tolist(), v.tolist(), layer(x, training=True).dtype)
"""
    out = _run("-c", code).split("\n")[0]
    assert out == f"{[4.5, 5.5, 6.5]} {[11.25, 11.25, 11.25]} bfloat16"


def test_train_digits_help_shows_the_defaults():
    text = _run(str(ROOT / "examples" / "train_digits.py"), "--help")
    assert "(default: 20)" in text and "(default: 64)" in text and "(default: 0)" in text
