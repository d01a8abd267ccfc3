"""README.md's commands for the example and the command line run as written.

They are written with the set-up's venv paths (``.venv/bin/...``); here ``.venv/bin/`` is
replaced by the directory of the interpreter running the tests, which is that venv in CI
(or the wheel's venv). The build, C and wheel commands are run verbatim by ``.ci/run``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BIN = str(Path(sys.executable).parent) + "/"


def _readme_line(fragment: str) -> str:
    lines = [line for line in README.splitlines() if fragment in line]
    assert lines, f"README.md has no line with {fragment!r}"
    return lines[0].strip().strip("`")


def _run(command: str) -> str:
    env = dict(os.environ, PATH=BIN.rstrip("/") + os.pathsep + os.environ.get("PATH", ""))
    done = subprocess.run(["/bin/bash", "-c", command.replace(".venv/bin/", BIN)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.parametrize("fragment", [
    ".venv/bin/python examples/train_digits.py --help",
    ".venv/bin/python -m cbn --version",
])
def test_inline_command_runs(fragment):
    assert fragment in README
    _run(fragment)


def test_example_training_commands_run_as_written():
    one = _run(_readme_line(".venv/bin/python examples/train_digits.py"))
    assert "test accuracy" in one
    mpiexec = Path(BIN) / "mpiexec"
    assert mpiexec.exists(), "the [mpi] extra puts mpiexec next to the venv's Python"
    two = _run(_readme_line("mpiexec -n 2 .venv/bin/python examples/train_digits.py"))
    assert "test accuracy" in two
