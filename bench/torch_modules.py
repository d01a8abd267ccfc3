"""cbn.torch modules against torch's own batch norm modules, forward + backward.

    python bench/torch_modules.py                      # compare.py's cases, 1 and 2 threads
    python bench/torch_modules.py --quick --threads 2  # the quick cases, fewer samples

The compare.py cases in float32: NHWC cases run as channels_last tensors of the NCHW
shape, NCHW cases as contiguous ones, (N, C) cases with BatchNorm1d. Each row is one
training step of the module alone (forward, then backward of a fixed gradient), all
implementations sampled in turn in one process (bench/cbnbench/timing.py), medians.
The tiny case also compares the module with the raw ``cbn.ops`` calls it wraps: the
difference is the module's per-call overhead.
"""

from __future__ import annotations

import sys

import cbn
import cbn.ops
import cbn.torch
import numpy as np
import torch
from cbnbench.cases import TINY, Case, case_arguments, select_cases
from cbnbench.timing import DEFAULT, QUICK, interleaved_medians


def torch_input(case: Case) -> torch.Tensor:
    """The case's input as a float32 tensor: channels_last for NHWC, else contiguous."""
    gen = torch.Generator().manual_seed(0)
    if case.layout == "NHWC":
        n, h, w, c = case.shape
        x = torch.randn((n, c, h, w), generator=gen).contiguous(memory_format=torch.channels_last)
    elif case.layout == "NC":
        x = torch.randn(case.shape, generator=gen)
    else:
        x = torch.randn(case.shape, generator=gen)
    return x.requires_grad_()


def module_step(module: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor):
    def step():
        x.grad = None
        for p in module.parameters():
            p.grad = None
        module(x).backward(dy)
    return step


def raw_ops_step(x: torch.Tensor, dy: torch.Tensor, channels: int):
    """cbn.ops on NumPy views of the same memory: the floor a module call can reach."""
    xa, dya = x.detach().numpy(), dy.numpy()
    gamma, beta = np.ones(channels, np.float32), np.zeros(channels, np.float32)

    def step():
        _, mean, var = cbn.ops.batch_norm_train(xa, gamma=gamma, beta=beta, axis=1,
                                                epsilon=1e-5)
        cbn.ops.batch_norm_backward(dya, xa, mean, var, gamma=gamma, axis=1, epsilon=1e-5)
    return step


def calls_for(case: Case) -> dict:
    x = torch_input(case)
    dy = torch.randn(x.shape).contiguous(
        memory_format=torch.channels_last if case.layout == "NHWC" else torch.contiguous_format)
    channels = x.shape[1]
    torch_cls, cbn_cls = ((torch.nn.BatchNorm1d, cbn.torch.BatchNorm1d) if x.dim() == 2
                          else (torch.nn.BatchNorm2d, cbn.torch.BatchNorm2d))
    calls = {"torch nn": module_step(torch_cls(channels), x, dy),
             "cbn.torch": module_step(cbn_cls(channels), x, dy)}
    if case.name == TINY.name:
        calls["cbn.ops raw"] = raw_ops_step(x, dy, channels)
    return calls


def main(argv: list[str] | None = None) -> int:
    args = case_arguments(argv, __doc__.split("\n\n")[0])
    policy = QUICK if args.quick else DEFAULT
    cases = select_cases(args.cases, args.quick)
    print("| case | layout | threads | torch nn (ms) | cbn.torch (ms) | speed-up | "
          "cbn.ops raw (ms) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for case in cases:
        calls = calls_for(case)
        for n in args.threads:
            torch.set_num_threads(n)
            cbn.set_num_threads(n)
            med = interleaved_medians(calls, policy)
            raw = f"{med['cbn.ops raw'] * 1e3:.4f}" if "cbn.ops raw" in med else ""
            print(f"| {case.name} | {case.layout} | {n} | {med['torch nn'] * 1e3:.4f} | "
                  f"{med['cbn.torch'] * 1e3:.4f} | {med['torch nn'] / med['cbn.torch']:.2f}x | "
                  f"{raw} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
