"""One rank of cbn.torch.SyncBatchNorm on torch.distributed (gloo), checked against one
process running torch's nn.BatchNorm2d on the concatenated batch in float64.

Run by ``test_torch_sync.py``, one process per rank::

    RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python tests/torch_sync_check.py

The ranks hold uneven shards (4 and 3 images; the last rank's in channels_last). Each
rank checks its slice of the output and of the input gradient, the running statistics
after two steps, and the parameter gradients summed over ranks; it prints
``rank R of W: ok`` and exits 0, or prints the failure and exits 1.
"""

from __future__ import annotations

import os
import sys
import traceback

import cbn.torch
import torch
import torch.distributed as dist
from torch import nn

SHARDS = [4, 3]


def check(rank: int) -> None:
    torch.manual_seed(0)
    ref = nn.SyncBatchNorm(3, momentum=0.2, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    ours = cbn.torch.convert(nn.Sequential(nn.SyncBatchNorm(3, momentum=0.2,
                                                            dtype=torch.float64)))[0]
    assert type(ours) is cbn.torch.SyncBatchNorm
    ours.load_state_dict(ref.state_dict())
    ref = nn.BatchNorm2d(3, momentum=0.2, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    start = sum(SHARDS[:rank])
    rows = slice(start, start + SHARDS[rank])
    fmt = torch.channels_last if rank == len(SHARDS) - 1 else torch.contiguous_format
    for _ in range(2):
        x = torch.randn(sum(SHARDS), 3, 4, 5, dtype=torch.float64) * 3 + 2
        dy = torch.randn_like(x)
        xr = x.clone().requires_grad_()
        ry = ref(xr)
        ry.backward(dy)
        xs = x[rows].contiguous(memory_format=fmt).requires_grad_()
        y = ours(xs)
        y.backward(dy[rows])
        torch.testing.assert_close(y, ry[rows].detach(), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(xs.grad, xr.grad[rows], rtol=1e-10, atol=1e-10)
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(value, ref.state_dict()[name], rtol=1e-10, atol=1e-10)
    for p, rp in ((ours.weight, ref.weight), (ours.bias, ref.bias)):
        total = p.grad.clone()
        dist.all_reduce(total)
        torch.testing.assert_close(total, rp.grad, rtol=1e-10, atol=1e-10)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x[rows]), ref(x[rows]), rtol=1e-12, atol=1e-12)


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        check(rank)
    except Exception:
        traceback.print_exc()
        print(f"rank {rank} of {world}: FAILED", flush=True)
        return 1
    finally:
        dist.destroy_process_group()
    print(f"rank {rank} of {world}: ok", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
