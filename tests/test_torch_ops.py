"""torch.ops.cbn.* custom operators: values against float64 references written here,
gradients against torch's autograd of the same formula and finite differences."""

import cbn.torch  # noqa: F401  (registers torch.ops.cbn)
import pytest
import torch

OPS = torch.ops.cbn


def reference_train(x, weight, bias, axes, eps, mask):
    """Masked batch statistics and normalization by plain torch float64 arithmetic."""
    axes = sorted(a % x.dim() for a in axes)
    reduce = [d for d in range(x.dim()) if d not in axes]
    used = torch.ones_like(x) if mask is None else (mask != 0).to(x.dtype).expand_as(x)
    count = used.sum(reduce, keepdim=True)
    mean = (x * used).sum(reduce, keepdim=True) / count
    var = ((x - mean) ** 2 * used).sum(reduce, keepdim=True) / count
    y = (x - mean) / torch.sqrt(var + eps)
    cshape = [x.shape[a] if a in axes else 1 for a in range(x.dim())]
    if weight is not None:
        y = y * weight.reshape(cshape)
    if bias is not None:
        y = y + bias.reshape(cshape)
    return y, mean.reshape([x.shape[a] for a in axes]), var.reshape([x.shape[a] for a in axes])


def leaf(*shape, scale=1.0, shift=0.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale + shift).requires_grad_()


@pytest.mark.parametrize(
    "shape,axes,mask_shape",
    [((6, 4, 5, 3), [1], None), ((6, 4, 5, 3), [-1], None), ((6, 4, 5, 3), [1, 3], None),
     ((6, 5, 4), [-1], (6, 5, 1)), ((6, 4, 5, 3), [1], (5, 3)), ((7, 3), [1], (7, 1))],
)
def test_train_values_and_gradients_match_float64_reference(shape, axes, mask_shape):
    torch.manual_seed(1)
    x = leaf(*shape, scale=3.0, shift=2.0)
    cshape = [shape[a % len(shape)] for a in sorted(a % len(shape) for a in axes)]
    weight, bias = leaf(*cshape), leaf(*cshape)
    mask = None if mask_shape is None else torch.rand(mask_shape) > 0.3
    y, mean, var = OPS.batch_norm_train(x, weight, bias, axes, 1e-3, mask)
    ry, rmean, rvar = reference_train(x, weight, bias, axes, 1e-3, mask)
    torch.testing.assert_close(y, ry, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, rmean.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, rvar.detach(), rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, weight, bias), dy)
    want = torch.autograd.grad(ry, (x, weight, bias), dy)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_infer_values_and_gradients_match_float64_reference():
    torch.manual_seed(2)
    x, weight, bias = leaf(5, 3, 4), leaf(3), leaf(3)
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    y = OPS.batch_norm_infer(x, mean, var, weight, bias, [1], 1e-5)
    ry = (x - mean[:, None]) / torch.sqrt(var[:, None] + 1e-5) * weight[:, None] + bias[:, None]
    torch.testing.assert_close(y, ry, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    for g, w in zip(torch.autograd.grad(y, (x, weight, bias), dy),
                    torch.autograd.grad(ry, (x, weight, bias), dy), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_gradcheck_train_infer_and_masked():
    torch.manual_seed(3)
    x, weight, bias = leaf(4, 3, 3, 2), leaf(3), leaf(3)
    mask = torch.tensor([1, 0, 1, 1]).reshape(4, 1, 1, 1)
    assert torch.autograd.gradcheck(
        lambda x, w, b: OPS.batch_norm_train(x, w, b, [1], 1e-3, mask)[0], (x, weight, bias))
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda x, w, b: OPS.batch_norm_infer(x, mean, var, w, b, [1], 1e-3), (x, weight, bias))


def test_backward_op_matches_autograd_and_double_backward_raises():
    torch.manual_seed(4)
    x, weight = leaf(8, 3), leaf(3)
    y, mean, var = OPS.batch_norm_train(x, weight, None, [1], 1e-5, None)
    dy = torch.randn_like(y)
    dx, dweight, dbias = OPS.batch_norm_backward(dy, x, mean, var, weight, [1], 1e-5, None, True)
    gx, gw = torch.autograd.grad(y, (x, weight), dy, retain_graph=True)
    torch.testing.assert_close(dx, gx)
    torch.testing.assert_close(dweight, gw)
    torch.testing.assert_close(dbias, dy.sum(0))
    (gx,) = torch.autograd.grad(y, x, dy, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gx.sum(), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_reduced_precision_and_memory_format(dtype, channels_last):
    torch.manual_seed(5)
    x64 = torch.randn(4, 6, 5, 5, dtype=torch.float64) * 2 + 1
    x = x64.to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    y, mean, var = OPS.batch_norm_train(x, None, None, [1], 1e-5, None)
    assert y.dtype == dtype and mean.dtype == var.dtype == torch.float32
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    ry, rmean, rvar = reference_train(x.double(), None, None, [1], 1e-5, None)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(y.double(), ry.to(dtype).double(), rtol=tol, atol=tol)
    torch.testing.assert_close(mean.double(), rmean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.double(), rvar, rtol=1e-5, atol=1e-5)


def test_opcheck_fake_and_autograd_registrations():
    torch.manual_seed(6)
    x, weight, bias = leaf(4, 3, 2), leaf(3), leaf(3)
    y, mean, var = OPS.batch_norm_train(x, weight, bias, [1], 1e-5, None)
    torch.library.opcheck(OPS.batch_norm_train.default, (x, weight, bias, [1], 1e-5, None))
    torch.library.opcheck(OPS.batch_norm_infer.default,
                          (x, mean.detach(), var.detach(), weight, bias, [1], 1e-5))
    torch.library.opcheck(OPS.batch_norm_backward.default,
                          (torch.randn_like(x), x.detach(), mean.detach(), var.detach(),
                           weight.detach(), [1], 1e-5, None, True))


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="out of range"):
        OPS.batch_norm_train(x, None, None, [2], 1e-5, None)
    with pytest.raises(ValueError, match="weight has shape"):
        OPS.batch_norm_train(x, torch.ones(4), None, [1], 1e-5, None)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        OPS.batch_norm_train(x.long(), None, None, [1], 1e-5, None)
    with pytest.raises(ValueError, match="does not broadcast"):
        OPS.batch_norm_train(x, None, None, [1], 1e-5, torch.ones(3, 1))
