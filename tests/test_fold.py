"""Folding a batch normalization into the linear layer before it: ``cbn.ops.fold``
and ``cbn.torch.fold``, against the unfolded pair computed in float64."""

from __future__ import annotations

import cbn
import numpy as np
import pytest
from cbn import ops

torch = pytest.importorskip("torch")  # the [test] extra installs it
import cbn.torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

RNG = np.random.default_rng(11)


def _bn_parameters(channels: int) -> dict[str, np.ndarray]:
    return {"mean": RNG.standard_normal(channels), "variance": RNG.random(channels) + 0.1,
            "gamma": RNG.standard_normal(channels), "beta": RNG.standard_normal(channels)}


def _bn(z: np.ndarray, p: dict, epsilon: float, axis: int) -> np.ndarray:
    shape = [1] * z.ndim
    shape[axis] = -1
    def c(v):
        return v.reshape(shape)
    return (z - c(p["mean"])) / np.sqrt(c(p["variance"]) + epsilon) * c(p["gamma"]) + c(p["beta"])


def test_dense_in_keras_layout_equals_bn_after_dense():
    x, w, b = RNG.standard_normal((5, 3)), RNG.standard_normal((3, 4)), RNG.standard_normal(4)
    p = _bn_parameters(4)
    new_w, new_b = ops.fold(w, b, p["mean"], p["variance"], gamma=p["gamma"], beta=p["beta"],
                            epsilon=1e-3, axis=-1)
    np.testing.assert_allclose(x @ new_w + new_b, _bn(x @ w + b, p, 1e-3, -1), rtol=1e-13,
                               atol=1e-13)
    assert new_w.dtype == np.float64 and new_b.dtype == np.float64


@pytest.mark.parametrize("keras_layout", [False, True])
def test_conv_weights_in_either_layout_equal_bn_after_conv(keras_layout):
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    w_oihw, b = torch.randn(5, 3, 3, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    p = _bn_parameters(5)
    w = w_oihw.permute(2, 3, 1, 0).numpy() if keras_layout else w_oihw.numpy()  # HWIO or OIHW
    new_w, new_b = ops.fold(w, b.numpy(), p["mean"], p["variance"], gamma=p["gamma"],
                            beta=p["beta"], epsilon=1e-5, axis=-1 if keras_layout else 0)
    new_oihw = torch.from_numpy(np.ascontiguousarray(
        new_w.transpose(3, 2, 0, 1) if keras_layout else new_w))
    folded = F.conv2d(x, new_oihw, torch.from_numpy(new_b))
    unfolded = _bn(F.conv2d(x, w_oihw, b).numpy(), p, 1e-5, 1)
    np.testing.assert_allclose(folded.numpy(), unfolded, rtol=1e-12, atol=1e-12)


def test_float32_in_place_without_bias_gamma_or_beta():
    w = RNG.standard_normal((6, 4)).astype(np.float32)
    original = w.astype(np.float64)
    mean, variance = RNG.standard_normal(6), RNG.random(6) + 0.5
    new_w, new_b = ops.fold(w, None, mean, variance, epsilon=1e-3, axis=0, out=w)
    assert new_w is w and new_b.dtype == np.float32
    scale = 1 / np.sqrt(variance + 1e-3)
    np.testing.assert_allclose(w, original * scale[:, None], rtol=3e-7)
    np.testing.assert_allclose(new_b, -mean * scale, rtol=1e-7)


def test_bad_arguments_raise_and_write_nothing():
    w = np.ones((3, 4))
    out = np.zeros_like(w)
    p = _bn_parameters(4)
    with pytest.raises(TypeError, match="one int"):
        ops.fold(w, None, p["mean"], p["variance"], axis=[0, 1])
    with pytest.raises(ValueError, match="mean has shape"):
        ops.fold(w, None, p["mean"], p["variance"], axis=0, out=out)  # 3 output channels
    with pytest.raises(ValueError, match="epsilon"):
        ops.fold(w, None, p["mean"], p["variance"], epsilon=-1.0, out=out)
    with pytest.raises(TypeError, match="mean and variance"):
        ops.fold(w, None, None, p["variance"], out=out)
    assert not out.any()


# ----------------------------------------------------------------------------- torch.fold


class _Block(nn.Module):
    """A ResNet-style block: conv-BN-ReLU-conv-BN plus a conv-BN shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


def _model(dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          _Block(8, 16), nn.Flatten(), nn.Linear(16 * 4 * 4, 10),
                          nn.BatchNorm1d(10)).to(dtype)
    for m in model.modules():  # running statistics away from 0 and 1, affine away from 1, 0
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.normal_(m.weight)
            nn.init.normal_(m.bias)
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_torch_fold_keeps_a_resnet_style_models_outputs(dtype, rtol):
    model = _model(dtype)
    x = torch.randn(4, 3, 8, 8, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
        assert cbn.torch.fold(model) is model
        got = model(x)
    left = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert left == []  # all five followed a conv or linear layer
    scale = expected.abs().max().item()
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=rtol, atol=rtol * scale)


def test_torch_fold_after_convert_and_with_an_untraceable_forward():
    class Untraceable(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU())
            self.tail = nn.BatchNorm1d(4)  # follows a ReLU: not foldable

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: fx cannot trace it
                x = x * 2
            return self.tail(self.body(x))

    torch.manual_seed(1)
    model = cbn.torch.convert(Untraceable().double()).eval()
    model.body[1].running_var.uniform_(0.5, 2.0)
    x = torch.rand(3, 2, 7, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        cbn.torch.fold(model)
        got = model(x)
    assert isinstance(model.body[1], nn.Identity) and isinstance(model.tail, nn.BatchNorm1d)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-12, atol=1e-12)


def test_torch_fold_refuses_training_mode_and_changes_nothing():
    model = _model(torch.float32).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="eval"):
        cbn.torch.fold(model)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(TypeError, match="nn.Module"):
        cbn.torch.fold("model")
