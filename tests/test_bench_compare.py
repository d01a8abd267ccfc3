"""bench/compare.py's repeated rounds: each cell is the median of its rounds' medians,
and the documented A/B command runs (against a copy of this very build). No timing is
asserted."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import cbn

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "bench")
sys.path.insert(0, BENCH)

from cbnbench.cases import Case  # noqa: E402
from cbnbench.report import Row, median_over_rounds  # noqa: E402


def test_median_over_rounds_takes_each_columns_median():
    case = Case((4, 8), "NC")
    rounds = [
        [Row(case, "infer", 1, {"cbn-out": 3.0, "prev-out": 9.0}, 0.0),
         Row(case, "train", 1, {"cbn-out": 5.0}, None)],
        [Row(case, "infer", 1, {"cbn-out": 1.0, "prev-out": 7.0}, 0.2),
         Row(case, "train", 1, {"cbn-out": 6.0}, None)],
        [Row(case, "infer", 1, {"cbn-out": 2.0}, 0.1),
         Row(case, "train", 1, {"cbn-out": 4.0}, None)],
    ]
    infer, train = median_over_rounds(rounds)
    assert (infer.mode, train.mode) == ("infer", "train")
    # a column missing from a round takes the median of the rounds that ran it
    assert infer.seconds == {"cbn-out": 2.0, "prev-out": 8.0}
    assert infer.other_cpus == 0.2  # the busiest round's load is reported
    assert train.seconds == {"cbn-out": 5.0}
    assert train.other_cpus is None


def test_compare_runs_rounds_against_another_build(tmp_path):
    previous = tmp_path / "cbn"
    shutil.copytree(os.path.dirname(cbn.__file__), previous)
    out = tmp_path / "results.md"
    done = subprocess.run(
        [sys.executable, os.path.join(BENCH, "compare.py"), "--quick", "--rounds", "2",
         "--cases", "2x3", "--threads", "1", "--against", str(previous),
         "--skip", "torch,onnxruntime,tensorflow,keras,numpy,limit", "--out", str(out)],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "round 2 of 2" in done.stdout
    text = out.read_text()
    assert "each cell the median of 2 rounds" in text
    assert text.count("| 2x3 ") >= 6  # infer, train, backward in both tables
    assert "xprev-out" in text


def test_compare_refuses_a_round_count_below_one():
    done = subprocess.run([sys.executable, os.path.join(BENCH, "compare.py"), "--rounds", "0"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--rounds takes a positive integer" in done.stderr
