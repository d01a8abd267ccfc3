"""cbn.torch's fused batch norm + activation (+ residual add) against torch's own
``F.batch_norm`` → ``+ residual`` → activation in float64: outputs, running statistics
and gradients (x, weight, bias, residual) for every activation, module, memory format
and mode; reduced precision; gradcheck; torch.compile; ``fuse`` on a ResNet-style model;
errors leave the buffers untouched."""

import copy
from pathlib import Path

import cbn.torch
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

# name -> (cbn keywords, torch's activation, kinks: where act' jumps)
ACTS = {
    "relu": ({}, F.relu, (0.0,)),
    "relu6": ({}, F.relu6, (0.0, 6.0)),
    "leaky_relu": ({"negative_slope": 0.2}, lambda z: F.leaky_relu(z, 0.2), (0.0,)),
    "hardtanh": ({"min_val": -0.5, "max_val": 1.5}, lambda z: F.hardtanh(z, -0.5, 1.5),
                 (-0.5, 1.5)),
    "silu": ({}, F.silu, ()),
    "gelu_tanh": ({}, lambda z: F.gelu(z, approximate="tanh"), ()),
    "identity": ({}, lambda z: z, ()),
}
# (cbn module, torch module, input shape, memory format)
LAYOUTS = [
    (cbn.torch.BatchNormAct1d, nn.BatchNorm1d, (6, 4), torch.contiguous_format),
    (cbn.torch.BatchNormAct1d, nn.BatchNorm1d, (5, 4, 7), torch.contiguous_format),
    (cbn.torch.BatchNormAct2d, nn.BatchNorm2d, (3, 4, 5, 6), torch.contiguous_format),
    (cbn.torch.BatchNormAct2d, nn.BatchNorm2d, (3, 4, 5, 6), torch.channels_last),
    (cbn.torch.BatchNormAct3d, nn.BatchNorm3d, (2, 4, 3, 5, 2), torch.contiguous_format),
    (cbn.torch.BatchNormAct3d, nn.BatchNorm3d, (2, 4, 3, 5, 2), torch.channels_last_3d),
]
F64 = torch.float64


def randn(shape, fmt=torch.contiguous_format, scale=1.0, shift=0.0, dtype=F64):
    return (torch.randn(shape, dtype=F64) * scale + shift).to(dtype).contiguous(
        memory_format=fmt)


def pair(cbn_cls, torch_cls, activation, channels=4):
    """(cbn module, torch batch norm) in float64 with the same random affine parameters."""
    ref = torch_cls(channels, momentum=0.3, dtype=F64)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-0.5, 0.5)
    ours = cbn_cls(channels, momentum=0.3, dtype=F64, activation=activation,
                   **ACTS[activation][0])
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def run(fn, module, x, residual, dy):
    """fn's output and the gradients of x, the parameters and the residual for dy."""
    x = x.clone().requires_grad_()
    residual = None if residual is None else residual.clone().requires_grad_()
    y = fn(x, residual)
    y.backward(dy)
    grads = [x.grad] + [p.grad.clone() for p in module.parameters()]
    if residual is not None:
        grads.append(residual.grad)
    module.zero_grad()
    return y.detach(), grads


def reference(bn, activation):
    act = ACTS[activation][1]
    return lambda x, residual: act(bn(x) if residual is None else bn(x) + residual)


def assert_same_state(ours, ref, tol=1e-12):
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(),
                                 strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("cbn_cls,torch_cls,shape,fmt", LAYOUTS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("activation", list(ACTS))
def test_modules_match_torch(cbn_cls, torch_cls, shape, fmt, with_residual, activation):
    torch.manual_seed(0)
    ours, ref = pair(cbn_cls, torch_cls, activation)
    for mode in ("train", "train", "eval"):
        ours.train(mode == "train")
        ref.train(mode == "train")
        x = randn(shape, fmt, scale=2.0, shift=3.0)
        residual = randn(shape, fmt, scale=3.0) if with_residual else None
        dy = randn(shape, fmt)
        y, grads = run(ours, ours, x, residual, dy)
        ry, rgrads = run(reference(ref, activation), ref, x, residual, dy)
        assert y.is_contiguous(memory_format=fmt)
        torch.testing.assert_close(y, ry, rtol=1e-12, atol=1e-12)
        for g, rg in zip(grads, rgrads, strict=True):
            torch.testing.assert_close(g, rg, rtol=1e-10, atol=1e-10)
        assert_same_state(ours, ref)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "silu"])
@pytest.mark.parametrize("affine", [True, False])
def test_functional_matches_torch_and_updates_running_stats(activation, affine):
    torch.manual_seed(1)
    shape = (4, 3, 5, 2)
    weight = randn(3, shift=1.0) if affine else None
    bias = randn(3) if affine else None
    mean, var = torch.zeros(3, dtype=F64), torch.ones(3, dtype=F64)
    ref_mean, ref_var = mean.clone(), var.clone()
    kw, act, _ = ACTS[activation]
    for training in (True, True, False):
        x, residual = randn(shape, scale=2.0, shift=1.0), randn(shape)
        y = cbn.torch.batch_norm_act(x, mean, var, weight, bias, training, 0.2, 1e-3,
                                     activation=activation, residual=residual, **kw)
        want = act(F.batch_norm(x, ref_mean, ref_var, weight, bias, training, 0.2, 1e-3)
                   + residual)
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=1e-12)
    y = cbn.torch.batch_norm_act(x, None, None, training=True, activation=activation, **kw)
    torch.testing.assert_close(y, act(F.batch_norm(x, None, None, training=True)))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("activation", list(ACTS))
def test_reduced_precision_within_rounding(dtype, tol, fmt, activation):
    torch.manual_seed(2)
    ours = cbn.torch.BatchNormAct2d(8, activation=activation, **ACTS[activation][0])
    ref = nn.BatchNorm2d(8, dtype=F64)
    shape = (4, 8, 6, 6)
    x, residual = randn(shape, fmt, 2.0, 1.0, dtype), randn(shape, fmt, dtype=dtype)
    x.requires_grad_()
    residual.requires_grad_()
    y = ours(x, residual)
    assert y.dtype == dtype and y.is_contiguous(memory_format=fmt)
    assert ours.running_mean.dtype == torch.float32
    want = reference(ref, activation)(x.double(), residual.double())
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(ours.running_var.double(), ref.running_var, rtol=1e-5,
                               atol=1e-5)
    y.float().square().sum().backward()
    assert ours.weight.grad.dtype == torch.float32 and residual.grad.dtype == dtype
    x64, res64 = x.detach().double().requires_grad_(), residual.detach().double()
    res64.requires_grad_()
    z = ref(x64) + res64
    ACTS[activation][1](z).square().sum().backward()
    # act' read from the rounded output may flip within a rounding of the kinks
    far = torch.ones_like(z, dtype=torch.bool)
    for k in ACTS[activation][2]:
        far &= (z.detach() - k).abs() > 2 * tol * max(1.0, abs(k))
    scale = x64.grad.abs().max()
    torch.testing.assert_close(x.grad.double()[far] / scale, x64.grad[far] / scale, rtol=0,
                               atol=4 * tol)
    torch.testing.assert_close(residual.grad.double()[far], res64.grad[far], rtol=8 * tol,
                               atol=8 * tol)


def away_from_kinks(z, residual, kinks):
    """``residual`` moved where ``z`` is within 0.01 of a kink (the statistics do not
    depend on the residual, so only those positions move)."""
    residual = residual.clone()
    for _ in range(10):
        near = torch.zeros_like(z, dtype=torch.bool)
        for k in kinks:
            near |= (z - k).abs() < 0.01
        if not near.any():
            return residual
        residual[near] += 0.05
        z = z + 0.05 * near
    raise AssertionError("could not move the inputs away from the kinks")


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(activation, training):
    torch.manual_seed(3)
    kw, _, kinks = ACTS[activation]
    x, weight, bias = randn((4, 3, 2, 2), scale=2.0), randn(3, shift=1.0), randn(3)
    # no running statistics in training: gradcheck's repeated calls change nothing
    stats = (None, None) if training else (randn(3), randn(3).abs() + 0.5)
    z = F.batch_norm(x, *stats, weight, bias, training)
    residual = away_from_kinks(z, randn(x.shape), kinks)
    inputs = tuple(t.requires_grad_() for t in (x, weight, bias, residual))

    def fn(x, weight, bias, residual):
        return cbn.torch.batch_norm_act(x, *stats, weight, bias, training,
                                        activation=activation, residual=residual, **kw)

    assert torch.autograd.gradcheck(fn, inputs)


def test_compile_fullgraph_equals_eager_with_residual():
    torch.manual_seed(4)
    eager = cbn.torch.BatchNormAct2d(4, activation="silu")
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = randn((3, 4, 5, 5), torch.channels_last, 2.0, 1.0, torch.float32)
        residual = randn((3, 4, 5, 5), dtype=torch.float32)
        outputs = []
        for module in (eager, compiled):
            res = residual.clone().requires_grad_()
            y = module(x, res)
            y.square().sum().backward()
            outputs.append((y.detach(), res.grad))
        for got, want in zip(outputs[1], outputs[0], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(eager.parameters(), compiled_module.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)
    assert_same_state(compiled_module, eager, tol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_export_keeps_the_fused_operators(training):
    module = cbn.torch.BatchNormAct2d(3, activation="relu6").train(training)
    x, residual = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    exported = torch.export.export(copy.deepcopy(module), (x, residual))
    op = "cbn.batch_norm_act_train" if training else "cbn.batch_norm_act_infer"
    assert op in str(exported.graph)
    torch.testing.assert_close(exported.module()(x, residual), module(x, residual))


class BasicBlock(nn.Module):
    """ResNet's block: conv → bn → relu → conv → bn → += shortcut → relu."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return torch.relu(out)


class SiluBlock(nn.Module):
    """Functional activations and ``torch.add`` with the batch norm second."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = cbn.torch.BatchNorm2d(c)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.silu(self.bn1(self.conv(x)))
        return F.leaky_relu(torch.add(x, self.bn2(out)), negative_slope=0.1)


def resnet_like():
    torch.manual_seed(6)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        BasicBlock(8, 8, 1), BasicBlock(8, 16, 2), SiluBlock(16),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.BatchNorm1d(16), nn.Linear(16, 5)).double()


def module_kinds(gm):
    return [type(gm.get_submodule(str(n.target))).__name__ for n in gm.graph.nodes
            if n.op == "call_module"]


def test_fuse_finds_the_chains_and_keeps_the_state():
    model = resnet_like()
    before = copy.deepcopy(model.state_dict())
    fused = cbn.torch.fuse(model)
    assert isinstance(fused, fx.GraphModule)
    kinds = module_kinds(fused)
    # stem, 2 x (bn1, bn2 + shortcut), SiluBlock's two; the downsample's BN is the
    # residual of its block's fused bn2; BatchNorm1d feeds a Linear.
    assert kinds.count("BatchNormAct2d") == 7
    assert kinds.count("BatchNorm2d") == 1 and kinds.count("BatchNorm1d") == 1
    assert "ReLU" not in kinds
    norms = [m for m in fused.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(type(m).__module__.startswith("cbn.torch") for m in norms)
    targets = {str(n.target) for n in fused.graph.nodes if n.op == "call_function"}
    assert not any(t.endswith(("relu>", "silu>", "leaky_relu>", "iadd>")) for t in targets)
    assert list(fused.state_dict()) == list(model.state_dict())
    for name, value in fused.state_dict().items():
        assert value.data_ptr() == model.state_dict()[name].data_ptr(), name
    assert type(model[1]) is nn.BatchNorm2d  # the model itself is unchanged
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_fuse_gives_the_same_outputs_and_training_steps():
    model = resnet_like()
    ref = copy.deepcopy(model)
    fused = cbn.torch.fuse(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(2):
        x = randn((4, 3, 8, 8), torch.channels_last)
        losses = []
        for net, o in ((fused, opt), (ref, ref_opt)):
            o.zero_grad()
            loss = net(x).square().mean()
            loss.backward()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
        for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=name)
        opt.step()
        ref_opt.step()
    assert_same_state(model, ref, tol=1e-10)
    fused.eval()
    ref.eval()
    x = randn((4, 3, 8, 8))
    torch.testing.assert_close(fused(x), ref(x), rtol=1e-10, atol=1e-12)


class Unfusable(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn1, self.bn2, self.bn3 = (nn.BatchNorm1d(3) for _ in range(3))
        self.gelu = nn.GELU()

    def forward(self, x):
        a = self.bn1(x)
        b = self.gelu(self.bn2(x))  # exact gelu: not fused
        c = F.relu(self.bn3(x) + 1.0)  # a constant, not a tensor
        return F.relu(a) + a + b + c  # bn1's output has two users


def test_fuse_leaves_other_patterns_and_converts_their_batch_norms():
    torch.manual_seed(7)
    model = Unfusable().double()
    fused = cbn.torch.fuse(model)
    assert module_kinds(fused) == ["BatchNorm1d", "BatchNorm1d", "GELU", "BatchNorm1d"]
    assert all(type(fused.get_submodule(n)) is cbn.torch.BatchNorm1d
               for n in ("bn1", "bn2", "bn3"))
    x = randn((5, 3))
    torch.testing.assert_close(fused(x), model(x), rtol=1e-12, atol=1e-12)


def test_fold_leaves_fused_batch_norms_alone():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), cbn.torch.BatchNormAct2d(4)).double()
    model(randn((2, 3, 5, 5)))
    model.eval()
    x = randn((2, 3, 5, 5))
    want = model(x)
    assert cbn.torch.fold(model) is model
    assert type(model[1]) is cbn.torch.BatchNormAct2d
    torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_modules_have_torch_state_dict_and_repr_names_the_activation():
    ref = nn.BatchNorm2d(5)
    ref(torch.randn(4, 5, 3, 3))
    ours = cbn.torch.BatchNormAct2d(5, activation="leaky_relu", negative_slope=0.3)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert_same_state(ours, ref)
    assert repr(ours) == ("BatchNormAct2d" + repr(ref)[len("BatchNorm2d"):-1]
                          + ", activation='leaky_relu', negative_slope=0.3)")


def test_bad_inputs_raise_before_buffers_change():
    with pytest.raises(ValueError, match="'tanh' is not an activation cbn fuses"):
        cbn.torch.BatchNormAct2d(3, activation="tanh")
    with pytest.raises(ValueError, match="min_val <= max_val"):
        cbn.torch.BatchNormAct2d(3, activation="hardtanh", min_val=1.0, max_val=0.0)
    module = cbn.torch.BatchNormAct2d(3)
    before = copy.deepcopy(module.state_dict())
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"residual has shape \(2, 3, 4, 1\)"):
        module(x, torch.randn(2, 3, 4, 1))
    with pytest.raises(ValueError, match="expected 3 channels"):
        module(torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3))
    for name, value in module.state_dict().items():
        assert torch.equal(value, before[name]), name
    mean, var = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="'swish' is not an activation"):
        cbn.torch.batch_norm_act(x, mean, var, training=True, activation="swish")
    with pytest.raises(ValueError, match="residual has shape"):
        cbn.torch.batch_norm_act(x, mean, var, training=True, residual=x[:1])
    with pytest.raises(ValueError, match="required when not training"):
        cbn.torch.batch_norm_act(x, None, None)
    assert torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.ones(3))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        cbn.torch.fuse([nn.BatchNorm2d(3)])


class Chain(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.bn, self.act = nn.BatchNorm2d(3), act

    def forward(self, x, residual):
        return self.act(self.bn(x) + residual)


@pytest.mark.parametrize("act,kind", [
    (nn.ReLU6(), ("relu6", {})), (lambda z: F.relu6(z, inplace=True), ("relu6", {})),
    (nn.LeakyReLU(0.3), ("leaky_relu", {"negative_slope": 0.3})),
    (nn.Hardtanh(-0.5, 2.0), ("hardtanh", {"min_val": -0.5, "max_val": 2.0})),
    (lambda z: F.hardtanh(z, -2.0, max_val=0.5), ("hardtanh", {"min_val": -2.0,
                                                               "max_val": 0.5})),
    (nn.GELU(approximate="tanh"), ("gelu_tanh", {})),
    (lambda z: F.gelu(z, approximate="tanh"), ("gelu_tanh", {})),
    (nn.SiLU(), ("silu", {})), (lambda z: z.relu_(), ("relu", {})),
], ids=["ReLU6", "F.relu6", "LeakyReLU", "Hardtanh", "F.hardtanh", "GELU", "F.gelu",
        "SiLU", "Tensor.relu_"])
def test_fuse_recognizes_each_activation(act, kind):
    torch.manual_seed(8)
    model = Chain(act).double()
    fused = cbn.torch.fuse(model)
    module = fused.get_submodule("bn")
    assert type(module) is cbn.torch.BatchNormAct2d
    assert module.activation == kind[0]
    assert {k: getattr(module, k) for k in kind[1]} == kind[1]
    x, residual = randn((4, 3, 3, 3), scale=2.0), randn((4, 3, 3, 3))
    torch.testing.assert_close(fused(x, residual), model(x, residual), rtol=1e-12,
                               atol=1e-12)


def test_readme_example_runs():
    """README.md's PyTorch "Fused activation and residual" example runs as written."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## PyTorch", 1)[1].split("#### Fused activation and residual", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
