"""Fused batch norm + ReLU (+ residual add) in cbn.torch against torch eager and
torch.compile, training mode.

    python bench/epilogue.py                       # compare.py's cases, 1 and 2 threads
    python bench/epilogue.py --quick               # the quick cases, fewer samples

The compare.py cases in float32, as bench/torch_modules.py makes them (NHWC cases as
channels_last tensors of the NCHW shape, NCHW contiguous, (N, C) with the 1-d modules).
Forward rows (under ``torch.no_grad``): ``cbn.torch.BatchNorm2d`` alone, and
``BatchNormAct2d`` with ReLU, without and with a residual; torch's ``nn.BatchNorm2d``
followed by ``torch.relu`` (and the add), eager and under ``torch.compile`` (inductor,
fullgraph). Step rows: forward and backward of a fixed gradient through BN → add →
ReLU (gradients for x, the residual and the parameters), cbn fused against torch eager
and torch.compile. Kernel rows: ``cbn.ops`` into preallocated ``out=`` buffers (no page
faults of fresh outputs): the training forward alone, with each activation, with a
residual and ReLU, and one read-only sweep of the residual (``cbn.ops.moments`` of it), so
that
``+add/(bn+read)`` is the fused call over its separate parts; inference with ReLU and with
a residual and ReLU against the memory-bound limit of the same traffic (the compiled
sweeps of bench/cbnbench/sweep.py, the faster of plain and streaming stores; ``share`` =
limit time / cbn time). Every implementation of a row group is sampled in turn in one
process (bench/cbnbench/timing.py), medians in ms. Ratios: ``+relu/bn`` and ``+add/bn``
are the fused calls over cbn's batch norm alone (the epilogue's cost); ``x...`` columns
are torch's time over cbn's fused one (above 1: cbn is faster).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import cbn
import cbn.torch
import numpy as np
import torch
from cbnbench.cases import Case, case_arguments, select_cases
from cbnbench.sweep import SweepUnavailable, build_sweep
from cbnbench.timing import DEFAULT, QUICK, Policy, interleaved_medians
from torch import nn
from torch_modules import torch_input

FORWARD = ("cbn BN", "cbn BN+relu", "cbn BN+add+relu", "torch BN>relu", "torch BN>add>relu",
           "compile BN>relu", "compile BN>add>relu")
STEP = ("cbn fused", "torch", "compile")
ACTIVATIONS = ("relu", "relu6", "leaky_relu", "silu", "gelu")
KERNEL = ("BN", *(f"BN+{a}" for a in ACTIVATIONS), "BN+add+relu", "read r",
          "infer+relu", "infer+add+relu", "limit 1-in", "limit 2-in")


def cpu_model() -> str:
    """``lscpu``'s model name."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (lscpu failed)"
    names = [line.split(":", 1)[1].strip() for line in out.splitlines()
             if line.startswith("Model name:")]
    return names[0] if names else "unknown"


def modules(x: torch.Tensor) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """(cbn BN, cbn BN+ReLU, torch BN, torch BN for the compiled function) for ``x``."""
    two_d = x.dim() == 2
    c = x.shape[1]
    cbn_bn = (cbn.torch.BatchNorm1d if two_d else cbn.torch.BatchNorm2d)(c)
    fused = (cbn.torch.BatchNormAct1d if two_d else cbn.torch.BatchNormAct2d)(c)
    torch_cls = nn.BatchNorm1d if two_d else nn.BatchNorm2d
    return cbn_bn, fused, torch_cls(c), torch_cls(c)


def forward_calls(x: torch.Tensor, r: torch.Tensor) -> dict[str, Callable[[], object]]:
    cbn_bn, fused, ref, ref_c = modules(x)

    def relu(z):
        return torch.relu(ref_c(z))

    def add_relu(z, res):
        return torch.relu(ref_c(z) + res)

    compiled_relu = torch.compile(relu, fullgraph=True)
    compiled_add = torch.compile(add_relu, fullgraph=True)
    calls = (lambda: cbn_bn(x), lambda: fused(x), lambda: fused(x, r),
             lambda: torch.relu(ref(x)), lambda: torch.relu(ref(x) + r),
             lambda: compiled_relu(x), lambda: compiled_add(x, r))
    return dict(zip(FORWARD, calls, strict=True))


def step_calls(x: torch.Tensor, r: torch.Tensor, dy: torch.Tensor
               ) -> dict[str, Callable[[], object]]:
    _, fused, ref, ref_c = modules(x)

    def add_relu(z, res):
        return torch.relu(ref_c(z) + res)

    compiled = torch.compile(add_relu, fullgraph=True)
    fns = (lambda: fused(x, r), lambda: torch.relu(ref(x) + r), lambda: compiled(x, r))

    def step(fn: Callable[[], torch.Tensor], params: list[torch.Tensor]):
        def run():
            for t in (x, r, *params):
                t.grad = None
            fn().backward(dy)
        return run

    params = (list(fused.parameters()), list(ref.parameters()), list(ref_c.parameters()))
    return {name: step(fn, p) for name, fn, p in zip(STEP, fns, params, strict=True)}


def inputs(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, residual, dy): the residual and dy in x's memory format."""
    x = torch_input(case)
    gen = torch.Generator().manual_seed(1)
    fmt = torch.channels_last if case.layout == "NHWC" else torch.contiguous_format
    r, dy = (torch.randn(x.shape, generator=gen).contiguous(memory_format=fmt)
             for _ in range(2))
    return x, r.requires_grad_(), dy


def memory_order(t: torch.Tensor) -> np.ndarray:
    """A C-contiguous NumPy view of ``t``'s memory (NHWC for a channels_last tensor)."""
    t = t.detach()
    return (t.permute(0, 2, 3, 1) if t.dim() == 4 and not t.is_contiguous() else t).numpy()


def kernel_calls(x: torch.Tensor, r: torch.Tensor, threads: int
                 ) -> dict[str, Callable[[], object]]:
    """cbn.ops calls into preallocated outputs, and the limits of their traffic."""
    xs, rs = memory_order(x), memory_order(r)
    axis = -1 if xs.ndim == 4 and not x.is_contiguous() else 1
    y = np.empty_like(xs)
    c = xs.shape[axis]
    mean, var = np.zeros(c), np.ones(c)
    calls: dict[str, Callable[[], object]] = {
        "BN": lambda: cbn.ops.batch_norm_train(xs, axis=axis, out=y)}
    for a in ACTIVATIONS:
        calls[f"BN+{a}"] = lambda a=a: cbn.ops.batch_norm_train(xs, axis=axis, out=y,
                                                                 activation=a)
    calls["BN+add+relu"] = lambda: cbn.ops.batch_norm_train(xs, axis=axis, out=y,
                                                            activation="relu", residual=rs)
    calls["read r"] = lambda: cbn.ops.moments(rs, axis=axis)
    calls["infer+relu"] = lambda: cbn.ops.batch_normalization(xs, mean, var, axis=axis, out=y,
                                                               activation="relu")
    calls["infer+add+relu"] = lambda: cbn.ops.batch_normalization(
        xs, mean, var, axis=axis, out=y, activation="relu", residual=rs)
    try:
        sweep = build_sweep()
    except SweepUnavailable:
        return calls
    for key, bind in (("limit 1-in", lambda nt: sweep.bind(xs, y, threads, nt)),
                      ("limit 2-in", lambda nt: sweep.bind_two_inputs(xs, rs, y, threads, nt))):
        calls[key + " plain"], calls[key + " nt"] = bind(False), bind(True)
    return calls


def kernel_row(head: str, k: dict[str, float]) -> str:
    """Medians in ms, then the epilogue's cost and the share of the limit."""
    limits = {key: min(k.get(key + " plain", np.nan), k.get(key + " nt", np.nan))
              for key in ("limit 1-in", "limit 2-in")}
    times = {**k, **limits}
    return (head + " | ".join(ms(times[key]) for key in KERNEL) + " | "
            + " | ".join(f"{k[f'BN+{a}'] / k['BN']:.2f}" for a in ACTIVATIONS) + " | "
            + f"{k['BN+add+relu'] / (k['BN'] + k['read r']):.2f} | "
            + f"{limits['limit 1-in'] / k['infer+relu']:.2f} | "
            + f"{limits['limit 2-in'] / k['infer+add+relu']:.2f} |")


def ms(t: float) -> str:
    return f"{t * 1e3:.4f}"


def run_case(case: Case, threads: list[int], policy: Policy
             ) -> tuple[list[str], list[str], list[str]]:
    # The compiled functions of every case share code objects: without a reset, the
    # recompiles (per shape, thread count and grad mode) hit dynamo's limit.
    torch._dynamo.reset()
    x, r, dy = inputs(case)
    forward, step = forward_calls(x.detach(), r.detach()), step_calls(x, r, dy)
    forward_rows, step_rows, kernel_rows = [], [], []
    for n in threads:
        torch.set_num_threads(n)
        cbn.set_num_threads(n)
        with torch.no_grad():
            f = interleaved_medians(forward, policy)
        s = interleaved_medians(step, policy)
        head = f"| {case.name} | {case.layout} | {n} | "
        kernel_rows.append(kernel_row(head, interleaved_medians(kernel_calls(x, r, n), policy)))
        forward_rows.append(
            head + " | ".join(ms(f[k]) for k in FORWARD) + " | "
            + f"{f['cbn BN+relu'] / f['cbn BN']:.2f} | {f['cbn BN+add+relu'] / f['cbn BN']:.2f} | "
            + f"{f['torch BN>relu'] / f['cbn BN+relu']:.2f}x | "
            + f"{f['torch BN>add>relu'] / f['cbn BN+add+relu']:.2f}x | "
            + f"{f['compile BN>relu'] / f['cbn BN+relu']:.2f}x | "
            + f"{f['compile BN>add>relu'] / f['cbn BN+add+relu']:.2f}x |")
        step_rows.append(head + " | ".join(ms(s[k]) for k in STEP) + " | "
                         + f"{s['torch'] / s['cbn fused']:.2f}x | "
                         + f"{s['compile'] / s['cbn fused']:.2f}x |")
        print(forward_rows[-1], step_rows[-1], kernel_rows[-1], sep="\n", file=sys.stderr,
              flush=True)
    return forward_rows, step_rows, kernel_rows


def main(argv: list[str] | None = None) -> int:
    args = case_arguments(argv, __doc__.split("\n\n")[0])
    policy = QUICK if args.quick else DEFAULT
    threads = args.threads
    forward_rows, step_rows, kernel_rows = [], [], []
    for case in select_cases(args.cases, args.quick):
        rows = run_case(case, threads, policy)
        forward_rows += rows[0]
        step_rows += rows[1]
        kernel_rows += rows[2]
    print(f"CPU: {cpu_model()}; torch {torch.__version__}; cbn {cbn.__version__}\n")
    print("Training forward (no grad), median ms\n")
    print("| case | layout | thr | " + " | ".join(FORWARD)
          + " | +relu/bn | +add/bn | xtorch relu | xtorch add | xcompile relu | "
          "xcompile add |")
    print("| --- | --- | ---: |" + " ---: |" * (len(FORWARD) + 6))
    print("\n".join(forward_rows))
    print("\nTraining step BN > add > relu (forward + backward), median ms\n")
    print("| case | layout | thr | " + " | ".join(STEP) + " | xtorch | xcompile |")
    print("| --- | --- | ---: |" + " ---: |" * (len(STEP) + 2))
    print("\n".join(step_rows))
    print("\nKernels: cbn.ops into out= buffers, median ms; the epilogue's cost (fused / BN "
          "alone, and fused / (BN alone + a read of the residual)); inference's share of the "
          "memory-bound limit\n")
    print("| case | layout | thr | " + " | ".join(KERNEL) + " | "
          + " | ".join(f"+{a}/bn" for a in ACTIVATIONS)
          + " | +add/(bn+read) | infer+relu share | infer+add+relu share |")
    print("| --- | --- | ---: |" + " ---: |" * (len(KERNEL) + len(ACTIVATIONS) + 3))
    print("\n".join(kernel_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
