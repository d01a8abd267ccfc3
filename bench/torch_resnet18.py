"""End to end: a ResNet-18 (defined here, random weights, no download) training step
and inference with torch's batch norm, after ``cbn.torch.convert``, after
``cbn.torch.fuse`` (batch norm → ReLU and batch norm → add → ReLU in one sweep), and under
``torch.compile`` with torch's batch norm (inductor generates its own BN code).

    python bench/torch_resnet18.py                       # batch 16, 112x112, 1 and 2 threads
    python bench/torch_resnet18.py --threads 2 --samples 3 --size 64   # a short run

A training step is forward, cross-entropy, backward and an SGD update; inference is an
eval-mode forward without grad. The "BN at no cost" column bounds what any batch norm
can give: in training the model with every batch norm replaced by ``nn.Identity``, in
inference ``cbn.torch.fold`` (every batch norm merged into its convolution). Both memory
formats (channels_last, contiguous). The variants of each (format, threads, mode) are
sampled in turn, medians. ``--profile`` adds the BN share of the eager training step
from torch.profiler: the time inside the batch norm modules' forward calls plus their
backward nodes, over the step's total.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import cbn
import cbn.torch
import torch
from torch import nn


def conv_bn(cin: int, cout: int, stride: int, kernel: int = 3) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout)]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*conv_bn(cin, cout, stride), nn.ReLU(inplace=True),
                                  *conv_bn(cout, cout, 1))
        self.shortcut = (nn.Sequential(*conv_bn(cin, cout, stride, kernel=1))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet18(classes: int = 1000) -> nn.Module:
    layers: list[nn.Module] = [*conv_bn(3, 64, 2, kernel=7), nn.ReLU(inplace=True),
                               nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


BOUND = "BN at no cost"


def without_batch_norm(model: nn.Module) -> nn.Module:
    """``model`` with every batch norm replaced by ``nn.Identity`` (in place)."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, nn.Identity())
        else:
            without_batch_norm(child)
    return model


def variants(fmt: torch.memory_format, mode: str, compile_too: bool) -> dict[str, nn.Module]:
    """The models compared in ``mode`` ("train" or "infer"), the same weights in each."""
    torch.manual_seed(0)
    base = resnet18().to(memory_format=fmt)
    if mode == "infer":
        base.eval()
    models = {"torch BN": base, "cbn.torch": cbn.torch.convert(copy.deepcopy(base)),
              "cbn.torch.fuse": cbn.torch.fuse(copy.deepcopy(base)),
              BOUND: (without_batch_norm(copy.deepcopy(base)) if mode == "train"
                      else cbn.torch.fold(copy.deepcopy(base)))}
    if compile_too:
        models["torch.compile (torch BN)"] = torch.compile(copy.deepcopy(base))
    return models


def train_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), labels).backward()
        opt.step()
    return step


def infer_step(model: nn.Module, x: torch.Tensor):
    def step():
        model.eval()
        with torch.no_grad():
            model(x)
    return step


def interleaved(fns: dict, samples: int, warmup: int) -> dict[str, float]:
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(samples):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


class _BnRegion:
    """Forward hooks that put each batch norm module's forward in a profiler range."""

    def __init__(self) -> None:
        self.ranges: dict[int, torch.profiler.record_function] = {}

    def pre(self, module, _inputs):
        self.ranges[id(module)] = torch.profiler.record_function("bn_module_forward")
        self.ranges[id(module)].__enter__()

    def post(self, module, _inputs, _output):
        self.ranges.pop(id(module)).__exit__(None, None, None)


def bn_share(model: nn.Module, step, steps: int = 3) -> float:
    """Fraction of the eager training step spent in batch norm (forward ranges plus
    the backward nodes of batch norm), from torch.profiler's CPU times."""
    region = _BnRegion()
    handles = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            handles += [m.register_forward_pre_hook(region.pre),
                        m.register_forward_hook(region.post)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.profiler.record_function("train_step"):
            for _ in range(steps):
                step()
    for h in handles:
        h.remove()
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}
    bn = totals.get("bn_module_forward", 0.0) + sum(
        t for k, t in totals.items()
        if k.startswith("autograd::engine::evaluate_function:")
        and ("BatchNorm" in k or "_EagerTrain" in k))
    return bn / totals["train_step"]


def run(fmt_name: str, threads: int, args) -> None:
    fmt = torch.channels_last if fmt_name == "channels_last" else torch.contiguous_format
    torch.set_num_threads(threads)
    cbn.set_num_threads(threads)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=gen).contiguous(
        memory_format=fmt)
    labels = torch.randint(0, 1000, (args.batch,), generator=gen)
    for mode in ("train", "infer"):
        models = variants(fmt, mode, not args.no_compile)
        fns = {k: (train_step(m, x, labels) if mode == "train" else infer_step(m, x))
               for k, m in models.items()}
        med = interleaved(fns, args.samples, args.warmup)
        base = med["torch BN"]
        cells = " | ".join(f"{med[k] * 1e3:.1f} ({base / med[k]:.2f}x)" for k in models)
        share = ""
        if args.profile and mode == "train":
            share = " | " + ", ".join(
                f"{k}: {bn_share(models[k], fns[k]):.0%}" for k in ("torch BN", "cbn.torch"))
        print(f"| {fmt_name} | {threads} | {mode} | {cells}{share} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--samples", type=int, default=9, help="timed calls per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (compiles)")
    p.add_argument("--formats", default="channels_last,contiguous")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--profile", action="store_true", help="add the BN share of the step")
    args = p.parse_args(argv)
    names = (["torch BN", "cbn.torch", "cbn.torch.fuse", BOUND]
             + ([] if args.no_compile else ["torch.compile (torch BN)"]))
    print(f"ResNet-18, batch {args.batch}, {args.size}x{args.size}, float32; ms per call "
          "(speed-up over torch BN)")
    print("| format | threads | mode | " + " | ".join(names)
          + (" | BN share of the step |" if args.profile else " |"))
    print("| --- | ---: | --- |" + " ---: |" * len(names) + (" --- |" if args.profile else ""))
    for fmt_name in args.formats.split(","):
        for threads in (int(t) for t in args.threads.split(",")):
            run(fmt_name, threads, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
