"""cbn.torch modules against torch's own modules in float64: outputs, running statistics,
gradients, every module, memory format, mode and option; reduced precision; state_dict;
errors leave the buffers untouched."""

import copy

import cbn.torch
import pytest
import torch
from torch import nn

# (cbn module, torch module, input shape, memory format)
LAYOUTS = [
    (cbn.torch.BatchNorm1d, nn.BatchNorm1d, (6, 4), torch.contiguous_format),
    (cbn.torch.BatchNorm1d, nn.BatchNorm1d, (5, 4, 7), torch.contiguous_format),
    (cbn.torch.BatchNorm2d, nn.BatchNorm2d, (3, 4, 5, 6), torch.contiguous_format),
    (cbn.torch.BatchNorm2d, nn.BatchNorm2d, (3, 4, 5, 6), torch.channels_last),
    (cbn.torch.BatchNorm3d, nn.BatchNorm3d, (2, 4, 3, 5, 2), torch.contiguous_format),
    (cbn.torch.BatchNorm3d, nn.BatchNorm3d, (2, 4, 3, 5, 2), torch.channels_last_3d),
]
OPTIONS = [  # (momentum, affine, track_running_stats, bias)
    (0.1, True, True, True), (None, True, True, True), (0.3, False, True, True),
    (0.1, True, False, True), (0.1, True, True, False),
]


def pair(cbn_cls, torch_cls, momentum, affine, track, bias):
    ref = torch_cls(4, momentum=momentum, affine=affine, track_running_stats=track, bias=bias,
                    dtype=torch.float64)
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            if ref.bias is not None:
                ref.bias.uniform_(-0.5, 0.5)
    ours = cbn_cls(4, momentum=momentum, affine=affine, track_running_stats=track, bias=bias,
                   dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def step(module, x, dy):
    x = x.clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    grads = [x.grad] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    return y.detach(), grads


def assert_same_state(ours, ref):
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(),
                                 strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("cbn_cls,torch_cls,shape,fmt", LAYOUTS)
@pytest.mark.parametrize("momentum,affine,track,bias", OPTIONS)
def test_training_steps_and_eval_match_torch(cbn_cls, torch_cls, shape, fmt, momentum, affine,
                                             track, bias):
    torch.manual_seed(0)
    ours, ref = pair(cbn_cls, torch_cls, momentum, affine, track, bias)
    for mode in ("train", "train", "train", "eval"):
        ours.train(mode == "train")
        ref.train(mode == "train")
        x = (torch.randn(shape, dtype=torch.float64) * 2 + 3).contiguous(memory_format=fmt)
        dy = torch.randn(shape, dtype=torch.float64)
        y, grads = step(ours, x, dy)
        ry, rgrads = step(ref, x, dy)
        assert y.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y, ry, rtol=1e-12, atol=1e-12)
        for g, rg in zip(grads, rgrads, strict=True):
            torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-10)
        assert_same_state(ours, ref)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 1.6e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_half_inputs_with_float32_parameters(dtype, tol, fmt):
    torch.manual_seed(1)
    ref, ours = nn.BatchNorm2d(8), cbn.torch.BatchNorm2d(8)
    x = (torch.randn(4, 8, 6, 6) + 1).to(dtype).contiguous(memory_format=fmt)
    y = ours(x)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    assert ours.weight.dtype == ours.running_mean.dtype == torch.float32
    want = ref.double()(x.double())
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(ours.running_var.double(), ref.running_var, rtol=1e-5, atol=1e-6)
    y.float().sum().backward()
    assert ours.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.float16, 2e-3),
                                       (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_of_every_buffer_dtype(dtype, tol, momentum):
    # float32/float64 buffers take the core's one-call update, half-precision ones NumPy's;
    # both bump the buffers' version counters as torch's in-place ops do.
    torch.manual_seed(4)
    ref = nn.BatchNorm2d(4, momentum=momentum).to(dtype)
    ours = cbn.torch.BatchNorm2d(4, momentum=momentum).to(dtype)
    versions = [b._version for b in ours.buffers()]
    for _ in range(3):
        x = (torch.randn(3, 4, 5, 5) * 2 + 1).to(dtype)
        ref(x)
        ours(x)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=tol, atol=tol,
                                   msg=name)
    assert all(b._version > v for b, v in zip(ours.buffers(), versions, strict=True))


def test_state_dict_round_trips_both_ways():
    torch.manual_seed(2)
    ref = nn.BatchNorm2d(5)
    ref(torch.randn(4, 5, 3, 3))
    ours = cbn.torch.BatchNorm2d(5)
    ours.load_state_dict(ref.state_dict())
    assert_same_state(ours, ref)
    ours(torch.randn(4, 5, 3, 3) * 2)
    back = nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())
    assert_same_state(back, ours)
    assert int(back.num_batches_tracked) == 2
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert repr(ours) == repr(ref)


def test_bad_inputs_raise_before_buffers_change():
    module = cbn.torch.BatchNorm2d(3)
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match="expected 4D input"):
        module(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="expected 3 channels"):
        module(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        module(torch.randn(1, 3, 1, 1))
    with pytest.raises(TypeError, match="dtype torch.int64"):
        module(torch.ones(2, 3, 2, 2, dtype=torch.long))
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_convert_keeps_state_and_matches_training_steps():
    torch.manual_seed(3)

    def block(c):
        return nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                             nn.ReLU())

    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), block(8), block(8),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(8),
                          nn.Linear(8, 4)).double()
    ref = copy.deepcopy(model)
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    ref(x)
    model.load_state_dict(ref.state_dict())
    ref.eval()
    model.eval()
    params_before = list(model.parameters())
    assert cbn.torch.convert(model) is model
    assert list(model.parameters()) == params_before and not model.training
    kinds = {type(m) for m in model.modules()}
    assert nn.BatchNorm2d not in kinds and cbn.torch.BatchNorm2d in kinds
    assert cbn.torch.BatchNorm1d in kinds
    torch.testing.assert_close(model(x), ref(x), rtol=1e-12, atol=1e-12)
    model.train()
    ref.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(3):
        xb = torch.randn(6, 3, 8, 8, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last)
        for net, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            net(xb).square().mean().backward()
            o.step()
    for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        cbn.torch.convert([nn.BatchNorm2d(3)])
