"""cbn.ops' small-call fast path with epilogue arguments: the same results, bit for bit, as
the general path (and the float64 reference of test_ops_epilogue), and every argument it
does not take left to the general path."""

from __future__ import annotations

import re

import numpy as np
import pytest
from cbn import _core
from test_ops_epilogue import ACTIVATIONS, EPS, Case, assert_output_close, f64, kwargs, residual_of

FAST_LAYOUTS = [
    pytest.param((2, 3), (1,), id="2x3"),
    pytest.param((4, 16, 5, 6), (1,), id="NCHW"),
    # At the serial threshold, with parameters past the stack buffer of 64 channels.
    pytest.param((4, 8, 8, 128), (3,), id="threaded-128-channels"),
]


def fast_forward(case, name, out=None, residual=None, **epilogue):
    """The forward on ``_core``'s fast path (asserted taken), as ``ops`` calls it: an int
    axis, a float epsilon, 1-D parameters. Returns (y, mean, variance or None)."""
    epilogue = {"residual": case.residual if residual is None else residual, **kwargs(name),
                **epilogue}
    axis = case.axes[0] - case.x.ndim
    if case.training:
        got = _core.train_fast(case.x, case.gamma, case.beta, axis, EPS, out, **epilogue)
    else:
        got = _core.normalize_fast(case.x, case.mean, case.var, case.gamma, case.beta, axis, EPS,
                                   out, **epilogue)
        got = None if got is None else (got, None, None)
    assert got is not None, "the call did not take the fast path"
    return got


def assert_same_bits(got, expected):
    for a, b in zip(got, expected, strict=True):
        assert a is b is None or (a.dtype, a.shape, a.tobytes()) == (b.dtype, b.shape, b.tobytes())


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape,axes", FAST_LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_fast_path_against_float64(name, residual, training, shape, axes, dtype):
    """The fast path's epilogue calls: within a few roundings of the float64 reference,
    and the same bits as the general path (a list axis) and as ``ops`` (an int axis)."""
    case = Case(shape, axes, dtype, training, residual=residual, seed=17)
    y, mean, var = got = fast_forward(case, name)
    assert_output_close(y, case, name)
    if training:
        np.testing.assert_allclose(mean, case.mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(var, case.var, rtol=1e-5)
    assert_same_bits(got, case.forward(name))
    assert_same_bits(got, case.forward(name, axis=axes[0] - len(shape)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("target", ["new", "separate", "x", "residual"])
def test_fast_path_outputs(target, training):
    """out: none, a separate array, x itself (in place) or the residual itself."""
    case = Case((8, 5, 6), (2,), np.float32, training, seed=18)
    x, residual = case.x.copy(), case.residual.copy()
    expected = case.forward("silu")
    out = {"new": None, "separate": np.empty_like(case.x), "x": case.x,
           "residual": case.residual}[target]
    got = fast_forward(case, "silu", out=out)
    assert out is None or got[0] is out
    case.x, case.residual = x, residual
    assert_same_bits(got, expected)


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("epilogue", [
    {"activation": "leaky_relu", "activation_alpha": 2},
    {"activation": "clip", "clip": [-1, 2]},
    {"activation": "clip", "clip": (0.25, 0.25)},
    {"activation": "clip", "clip": (-np.inf, 0.5)},
    {"activation": "linear"},
    {"activation": "identity", "residual": "strided"},
    {"activation": "gelu_tanh", "activation_alpha": -(10**30)},
], ids=str)
def test_fast_path_epilogue_arguments(epilogue, training):
    """Other real numbers, clip pairs, names and residual layouts the fast path takes."""
    case = Case((6, 7), (1,), np.float64, training, seed=19)
    if epilogue.get("residual") == "strided":
        epilogue = {**epilogue, "residual": residual_of("strided", (6, 7), np.float64, 19)}
    got = fast_forward(case, None, **epilogue)
    assert_same_bits(got, case.forward(None, **epilogue))


def overlapping(case):
    """A residual sharing some, not all, bytes with the ``out`` returned with it."""
    base = np.zeros((case.x.shape[0] + 1, *case.x.shape[1:]), case.x.dtype)
    return {"residual": base[1:], "out": base[:-1]}


@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("args", [
    {"activation": "swish"},
    {"activation": b"relu"},
    {"activation": "relu", "activation_alpha": np.float64(0.5)},
    {"activation": "relu", "activation_alpha": True},
    {"activation": "leaky_relu", "activation_alpha": np.nan},
    {"activation": "leaky_relu", "activation_alpha": 10**400},
    {"activation": "clip"},
    {"activation": "clip", "clip": (1.0, 0.0)},
    {"activation": "clip", "clip": (np.nan, 1.0)},
    {"activation": "clip", "clip": (0.0, np.float32(1.0))},
    {"activation": "clip", "clip": np.array([0.0, 1.0])},
    {"activation": "relu", "clip": (0.0, 1.0)},
    {"residual": "float64"},
    {"residual": "list"},
    {"residual": "row"},
    {"residual": "overlapping"},
], ids=str)
def test_fast_path_leaves_other_epilogues_to_the_general_path(args, training):
    """The fast path returns None for any other epilogue argument; ``ops`` then gives the
    general path's result or error, and writes nothing when it raises."""
    case = Case((4, 3), (1,), np.float32, training, seed=20)
    args = dict(args)
    residual = args.pop("residual", None)
    if residual is not None:
        args.update({"float64": {"residual": f64(case.x)}, "list": {"residual": case.x.tolist()},
                     "row": {"residual": case.x[0]}, "overlapping": overlapping(case)}[residual])
    if training:
        fast = _core.train_fast(case.x, case.gamma, case.beta, -1, EPS, **args)
    else:
        fast = _core.normalize_fast(case.x, case.mean, case.var, case.gamma, case.beta, -1, EPS,
                                    **args)
    assert fast is None
    try:
        expected = case.forward(None, **args)
    except (TypeError, ValueError, OverflowError) as e:
        out = args.get("out")
        before = None if out is None else out.copy()
        with pytest.raises(type(e), match=re.escape(str(e))):
            case.forward(None, axis=-1, **args)
        assert out is None or np.array_equal(out, before)
        return
    assert_same_bits(case.forward(None, axis=-1, **args), expected)
