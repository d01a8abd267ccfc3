"""Synchronized ``cbn.ops`` over real engines, one process per rank (spec R14): MPI
(mpi4py + MPICH from the ``[mpi]`` extra, ``mpiexec`` next to this Python) with 2 and 3
ranks, and torch.distributed (gloo) with 2 processes on localhost.

Each rank runs ``distributed_check.py``: every case against float64 NumPy on the
concatenated batch. Ranks use one OpenMP thread each; every launch is bounded by a
timeout. These tests fail (they do not skip) when an engine is missing: the README's
test command installs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_check import CASES
from gloo_ranks import run_gloo_ranks

CHECK = Path(__file__).with_name("distributed_check.py")
MPIEXEC = Path(sys.executable).with_name("mpiexec")
TIMEOUT = 180


def rank_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def assert_all_ranks_ok(outputs: list[str], returncodes: list[int], world: int) -> None:
    text = "\n".join(outputs)
    assert all(rc == 0 for rc in returncodes), f"exit codes {returncodes}\n{text}"
    for rank in range(world):
        assert f"rank {rank} of {world}: {len(CASES)} cases ok" in text, text


@pytest.mark.parametrize("ranks", [2, 3])
def test_mpi(ranks):
    assert MPIEXEC.exists(), (
        f"{MPIEXEC} not found: install the [mpi] extra (pip install '.[test,mpi]'), whose "
        "mpich wheel puts mpiexec next to the Python executable")
    # More ranks than cores: MPICH oversubscribes without asking.
    proc = subprocess.run(
        [str(MPIEXEC), "-n", str(ranks), sys.executable, str(CHECK), "mpi"],
        env=rank_env(), capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert_all_ranks_ok([proc.stdout + proc.stderr], [proc.returncode], ranks)


def test_torch_distributed_gloo():
    world = 2
    outputs, returncodes = run_gloo_ranks(CHECK, ["torch"], world, TIMEOUT)
    assert_all_ranks_ok(outputs, returncodes, world)
