"""cbn.torch.SyncBatchNorm on 2 gloo processes equals one process on the concatenated
batch (torch_sync_check.py); without a process group it is a plain batch norm."""

from pathlib import Path

import cbn.torch
import torch
from gloo_ranks import run_gloo_ranks
from torch import nn

CHECK = Path(__file__).with_name("torch_sync_check.py")
TIMEOUT = 180


def test_two_gloo_ranks_equal_one_process_on_the_whole_batch():
    world = 2
    outputs, returncodes = run_gloo_ranks(CHECK, [], world, TIMEOUT)
    text = "\n".join(outputs)
    assert returncodes == [0] * world, text
    for rank in range(world):
        assert f"rank {rank} of {world}: ok" in text, text


def test_without_process_group_it_is_a_plain_batch_norm():
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(3, dtype=torch.float64)
    ours = cbn.torch.SyncBatchNorm(3, dtype=torch.float64)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
