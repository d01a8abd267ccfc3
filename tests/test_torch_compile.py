"""cbn.torch modules under torch.compile(fullgraph=True) and torch.export: the same
results as eager, with the cbn operators in the graph (kept small: inductor compiles C++)."""

import copy

import cbn.torch
import pytest
import torch
from torch import nn


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), cbn.torch.BatchNorm2d(4), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def test_compile_fullgraph_training_step_equals_eager():
    # aot_eager: dynamo (fullgraph) and AOT autograd through the fake implementations
    # and the registered backward, without inductor's C++ compile of two graphs.
    eager = small_model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        x = torch.randn(5, 3, 6, 6).contiguous(memory_format=torch.channels_last)
        ye, yc = eager(x), compiled(x)
        torch.testing.assert_close(yc, ye, rtol=1e-5, atol=1e-5)
        ye.square().sum().backward()
        yc.square().sum().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    for a, b in zip(eager.buffers(), compiled_model.buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert int(compiled_model[1].num_batches_tracked) == 2


def test_inductor_inference_equals_eager():
    model = small_model().eval()
    x = torch.randn(5, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_export_keeps_the_cbn_operators(training):
    model = small_model().train(training)
    x = torch.randn(5, 3, 6, 6)
    exported = torch.export.export(copy.deepcopy(model), (x,))
    op = "cbn.batch_norm_train" if training else "cbn.batch_norm_infer"
    assert op in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_gradcheck_through_modules_in_float64():
    torch.manual_seed(1)
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    for training in (True, False):
        module = cbn.torch.BatchNorm2d(3, dtype=torch.float64).train(training)
        with torch.no_grad():
            module.weight.uniform_(0.5, 1.5)
            module.bias.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 1.5)
        # track_running_stats updates buffers on each call, which gradcheck repeats.
        module.momentum = 0.0
        assert torch.autograd.gradcheck(module, (x,))
