"""The torch backend's kernels: cbn's ``torch.ops.cbn`` custom operators (registered by
importing :mod:`cbn.torch`), which carry their own autograd formulas."""

from __future__ import annotations

import torch

try:
    from .. import torch as _registers_cbn_ops  # noqa: F401
except ImportError as err:
    raise ImportError(
        "cbn.keras on the torch backend needs cbn.torch (the torch.ops.cbn operators), "
        f"which failed to import: {err}"
    ) from err

__all__ = ["TorchKernels"]


class TorchKernels:
    @staticmethod
    def train(x, gamma, beta, mask, axes, epsilon):
        y, mean, variance = torch.ops.cbn.batch_norm_train(
            x, gamma, beta, list(axes), float(epsilon), mask
        )
        return y, mean, variance

    @staticmethod
    def infer(x, mean, variance, gamma, beta, axes, epsilon):
        return torch.ops.cbn.batch_norm_infer(
            x, mean, variance, gamma, beta, list(axes), float(epsilon)
        )
