"""cbn.torch.SyncBatchNorm on 2 gloo processes equals one process on the concatenated
batch (torch_sync_check.py); without a process group it is a plain batch norm."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import cbn.torch
import torch
from torch import nn

CHECK = Path(__file__).with_name("torch_sync_check.py")
TIMEOUT = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process_on_the_whole_batch():
    world = 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": str(world),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, str(CHECK)], env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    text = "\n".join(outputs)
    assert [p.returncode for p in procs] == [0] * world, text
    for rank in range(world):
        assert f"rank {rank} of {world}: ok" in text, text


def test_without_process_group_it_is_a_plain_batch_norm():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(3, dtype=torch.float64)
    ours = cbn.torch.SyncBatchNorm(3, dtype=torch.float64)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
