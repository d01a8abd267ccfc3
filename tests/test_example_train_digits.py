"""examples/train_digits.py: a short run learns the digits, and the test-time
forward is the affine map of the moving statistics, batch by batch or image by image."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_three_epochs_reach_90_percent(example, capsys):
    accuracy = example.main(["--epochs", "3", "--seed", "0"])
    assert accuracy >= 0.90
    lines = capsys.readouterr().out.split("\n")
    # Not a terminal: each epoch's bar is drawn once, full.
    assert [line.split(" loss")[0] for line in lines[:3]] == [
        f"\repoch {e}/3 [{'#' * 30}]" for e in (1, 2, 3)
    ]
    assert re.fullmatch(rf"test accuracy {accuracy:.4f} on 360 images .*", lines[3])
    assert lines[4:] == [""]


def test_quiet_prints_only_the_result(example, capsys):
    example.main(["--epochs", "1", "--quiet"])
    assert capsys.readouterr().out.startswith("test accuracy ")


def test_evaluation_uses_the_moving_statistics(example):
    rng = np.random.default_rng(1)
    x_train, y_train, x_test, _ = example.load_data(seed=1)
    net = example.Network(64, example.HIDDEN, 10, rng)
    example.train(net, x_train, y_train, epochs=2, batch_size=64, rng=rng, quiet=True)
    bn = net.bn
    assert not np.allclose(bn.moving_mean, 0.0)  # training moved them from their start

    # Float64 reference of the inference forward, from the weights alone.
    pre = x_test.astype(np.float64) @ net.w1
    normalized = (pre - bn.moving_mean) / np.sqrt(bn.moving_variance + bn.epsilon)
    hidden = np.maximum(normalized * bn.gamma + bn.beta, 0.0)
    expected = hidden @ net.w2 + net.b2

    batch_logits = net.forward(x_test, training=False)
    np.testing.assert_allclose(batch_logits, expected, rtol=1e-4, atol=1e-4)
    one_by_one = np.concatenate([net.forward(x_test[i : i + 1], training=False)
                                 for i in range(len(x_test))])
    np.testing.assert_allclose(one_by_one, batch_logits, rtol=1e-5, atol=1e-5)


def test_distributed_run_matches_one_process(tmp_path):
    """Issue 5: `mpiexec -n 2 ... --distributed` (each rank a slice of every batch,
    synchronized statistics, gradients summed) ends with the moving statistics and the
    accuracy of the one-process run."""
    mpiexec = Path(sys.executable).with_name("mpiexec")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = [str(EXAMPLE), "--epochs", "3", "--quiet", "--stats-out"]
    subprocess.run([sys.executable, *common, str(tmp_path / "one.npz")], check=True, env=env,
                   timeout=120, capture_output=True)
    run = subprocess.run([str(mpiexec), "-n", "2", sys.executable, *common,
                          str(tmp_path / "two.npz"), "--distributed"],
                         env=env, timeout=120, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "on 2 ranks" in run.stdout
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    for name in ("moving_mean", "moving_variance"):
        scale = np.abs(one[name]).max()
        np.testing.assert_allclose(two[name], one[name], rtol=1e-5, atol=1e-5 * scale)
    assert float(two["accuracy"]) == float(one["accuracy"])
