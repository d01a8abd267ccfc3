"""PyTorch integration: drop-in batch normalization modules on cbn's kernels.

- ``convert(model)``: every torch batch norm module of ``model`` on cbn, in place.
- ``fuse(model)``: a ``torch.fx.GraphModule`` of ``model`` with each batch norm →
  activation and batch norm → add → activation chain replaced by one fused
  ``BatchNormAct1d/2d/3d`` call (``act(bn(x) + residual)`` in one sweep over the data,
  and one in the backward), every other batch norm on cbn; the model is not modified.
- ``fold(model)``: inference batch norms merged into the convolution before them.
- ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``: drop-in modules; ``BatchNormAct1d/2d/3d``
  and the functional ``batch_norm_act``: the fused epilogue (activations in
  ``ACTIVATIONS``).

Importing this package registers the ``torch.ops.cbn`` custom operators
(:mod:`cbn.torch._ops`, :mod:`cbn.torch._epilogue_ops`).
"""

from __future__ import annotations

from . import _ops  # noqa: F401  (registers torch.ops.cbn.*)
from ._bn_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, batch_norm_act
from ._epilogue_ops import ACTIVATIONS
from ._fold import fold
from ._fuse import fuse
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, SyncBatchNorm, convert

__all__ = [
    "ACTIVATIONS", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormAct1d",
    "BatchNormAct2d", "BatchNormAct3d", "SyncBatchNorm", "batch_norm_act", "convert", "fold",
    "fuse",
]
