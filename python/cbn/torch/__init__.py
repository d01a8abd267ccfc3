"""PyTorch integration: drop-in batch normalization modules on cbn's kernels.

Importing this package registers the ``torch.ops.cbn`` custom operators
(:mod:`cbn.torch._ops`).
"""

from __future__ import annotations

from . import _ops  # noqa: F401  (registers torch.ops.cbn.*)
from ._fold import fold
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm, convert

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "convert", "fold",
]
