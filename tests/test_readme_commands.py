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


def _readme_line(start: str) -> str:
    """The README's command line (a line of a code block) that starts with ``start``."""
    lines = [line for line in README.splitlines() if line.startswith(start)]
    assert lines, f"README.md has no command line starting with {start!r}"
    return lines[0]


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
    two = _run(_readme_line("OMP_NUM_THREADS=1 .venv/bin/mpiexec -n 2 .venv/bin/python examples/"))
    assert "test accuracy" in two
