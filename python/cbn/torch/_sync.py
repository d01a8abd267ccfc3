"""Synchronized training forward and backward of :class:`cbn.torch.SyncBatchNorm`.

One ``torch.distributed`` all_reduce of cbn's 3·C moments buffer in the forward (counts,
shifted sums: exact for uneven batches, see :mod:`cbn.distributed`) and one of the
backward sums. Eager only: the collective goes through a Python callback.
"""

from __future__ import annotations

import torch

from .. import _core
from ..distributed import TorchAllreduce, sum_across_ranks
from ._ops import _param, as_numpy

_AXES = (1,)


class _SyncBatchNormTrain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, shift, group):
        c = x.shape[1]
        allreduce = TorchAllreduce(group)
        shift64 = _param(shift, c, "shift")
        summed = sum_across_ranks(allreduce, _core.moments_partial(as_numpy(x), _AXES, None,
                                                                   shift64))
        mean, var = _core.moments_finalize(summed, shift64)
        y = torch.empty_like(x)
        _core.normalize(as_numpy(x), as_numpy(y, output=True), _AXES, mean, var,
                        _param(weight, c, "weight"), _param(bias, c, "bias"), float(eps))
        ctx.save_for_backward(x, weight)
        ctx.stats, ctx.eps, ctx.allreduce = (mean, var), eps, allreduce
        ctx.has_bias = bias is not None
        return y, mean, var, int(summed[0])  # non-tensor outputs: no gradient

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        x, weight = ctx.saved_tensors
        c = x.shape[1]
        mean, var = ctx.stats
        dy = dy.to(x.dtype)
        dx = torch.empty_like(x)
        sums = _core.backward_sums(as_numpy(dy), as_numpy(x), _AXES, None, mean, var, ctx.eps)
        # This rank's Σdy and Σdy·x̂ are the parameter gradients (kept before the
        # collective, which sums in place); dx goes through the global sums.
        sum_dy, sum_dy_xhat = sums[c:2 * c].copy(), sums[2 * c:].copy()
        _core.backward_apply(as_numpy(dy), as_numpy(x), as_numpy(dx, output=True), _AXES, None,
                             mean, var, _param(weight, c, "weight"), ctx.eps,
                             sum_across_ranks(ctx.allreduce, sums))
        dweight = dbias = None
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = torch.from_numpy(sum_dy_xhat).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = torch.from_numpy(sum_dy).to(weight.dtype if weight is not None else x.dtype)
        return dx, dweight, dbias, None, None, None


def sync_batch_norm_train(x: torch.Tensor, module, group):
    """``(y, mean, biased var, values per channel over all ranks)`` for ``module``'s
    training forward on this rank's ``x``, the statistics as float64 arrays; the running
    mean (when tracked) is the shift every rank shares."""
    shift = module.running_mean if module.track_running_stats else None
    return _SyncBatchNormTrain.apply(x, module.weight, module.bias, module.eps, shift, group)
