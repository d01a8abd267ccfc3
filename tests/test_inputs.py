"""What ``cbn.ops`` accepts as arrays: NumPy views of any layout, buffer-protocol objects,
``__array__`` objects, DLPack producers and PyTorch CPU tensors, read and written in place
without copies. Values are checked against the float64 reference in conftest.py."""

from __future__ import annotations

import array
import tracemalloc

import numpy as np
import pytest
from cbn import ops

EPS = 1e-3


class ArrayLike:
    """Exposes a NumPy array only through ``__array__``."""

    def __init__(self, a):
        self._a = a

    def __array__(self, dtype=None, copy=None):
        return self._a if dtype is None else self._a.astype(dtype)


class DLPackOnly:
    """Exposes a NumPy array only through the DLPack protocol."""

    def __init__(self, a):
        self._a = a

    def __dlpack__(self, **kwargs):
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


def data(shape, seed=0, dtype=np.float32, loc=3.0, scale=2.0):
    return np.random.default_rng(seed).normal(loc, scale, size=shape).astype(dtype)


def check_train(ref, x_values, y, mean, var, axis=-1, mask=None):
    """batch_norm_train's results vs the reference computed from the input values."""
    ref.assert_stats_close(mean, var, x_values, axis, mask)
    rmean, rvar, _ = ref.moments(x_values, axis, mask)
    ref.assert_normalized(y, x_values, rmean, rvar, None, None, axis, EPS)


# ---------------------------------------------------------------------------- buffer protocol


def test_array_array(ref):
    values = data(40, seed=1).astype(np.float64)
    buf = array.array("d", values.tolist())
    mean = np.linspace(-1, 1, 40)
    var = np.linspace(0.5, 2, 40)
    y = ops.batch_normalization(buf, mean, var, axis=0, epsilon=EPS)
    ref.assert_normalized(y, values, mean, var, None, None, 0, EPS)
    m, v = ops.moments(buf, axis=0)  # every position its own channel: n = 1
    np.testing.assert_array_equal(m, values)
    np.testing.assert_array_equal(v, np.zeros(40))


def test_memoryview_multidimensional(ref):
    values = data((6, 5, 4), seed=2)
    mv = memoryview(values)
    assert mv.ndim == 3
    y, mean, var = ops.batch_norm_train(mv, axis=1)
    check_train(ref, values, y, mean, var, axis=1)


def test_bytearray_backed_memoryview_in_place(ref):
    # A writable buffer-protocol object is normalized in place through out=.
    values = data((8, 6), seed=3)
    raw = bytearray(values.tobytes())
    mv = memoryview(raw).cast("B").cast("f", shape=[8, 6])
    y, mean, var = ops.batch_norm_train(mv, axis=-1, out=mv)
    result = np.frombuffer(raw, dtype=np.float32).reshape(8, 6)
    check_train(ref, values, result, mean, var)
    np.testing.assert_array_equal(np.asarray(y), result)


def test_read_only_buffer_as_input(ref):
    values = data((7, 3), seed=4)
    frozen = memoryview(bytes(values.tobytes())).cast("f", shape=[7, 3])
    assert frozen.readonly
    y, mean, var = ops.batch_norm_train(frozen)
    check_train(ref, values, y, mean, var)


# ---------------------------------------------------------------------------- __array__, DLPack


def test_array_interface_object(ref):
    values = data((5, 4, 3), seed=5)
    obj = ArrayLike(values.copy())
    y, mean, var = ops.batch_norm_train(obj, axis=[0, 2])
    check_train(ref, values, y, mean, var, axis=[0, 2])
    ops.batch_normalization(obj, mean, var, axis=[0, 2], out=obj)  # in place, through __array__
    np.testing.assert_allclose(obj._a, y, rtol=1e-5, atol=1e-5)


def test_dlpack_producer_is_read_and_written_without_copy(ref):
    base = data((9, 4), seed=6)
    values = base.copy()
    obj = DLPackOnly(base)
    y, mean, var = ops.batch_norm_train(obj)
    check_train(ref, values, y, mean, var)
    # The input's own memory is what cbn sees: a reversed view of it overlaps.
    with pytest.raises(ValueError, match="overlap"):
        ops.batch_normalization(obj, mean, var, out=base[::-1])
    # ...and out= the producer itself writes into its memory.
    ops.batch_norm_train(obj, out=obj)
    check_train(ref, values, base, mean, var)


def test_dlpack_negative_strides(ref):
    base = data((10, 6), seed=7)
    view = base[::-1, ::-2]
    y, mean, var = ops.batch_norm_train(DLPackOnly(view))
    check_train(ref, view.copy(), y, mean, var)


# ---------------------------------------------------------------------------- NumPy views


VIEWS = {
    "reversed-rows": lambda b: b[::-1],
    "reversed-all": lambda b: b[::-1, ::-1, ::-1],
    "channel-stride-2": lambda b: b[:, :, ::2],
    "transposed": lambda b: b.transpose(2, 0, 1),
    "transposed-reversed": lambda b: b.transpose(1, 2, 0)[::-1, :, ::-3],
    "broadcast-stride-0": lambda b: np.broadcast_to(b[:1], b.shape),
}


@pytest.mark.parametrize("name", list(VIEWS))
@pytest.mark.parametrize("axis", [-1, 0, [0, 2]])
def test_views_give_correct_results_and_stay_untouched(ref, name, axis):
    base = data((12, 10, 14), seed=8, loc=-2.0)
    saved = base.copy()
    x = VIEWS[name](base)
    y, mean, var = ops.batch_norm_train(x, axis=axis)
    check_train(ref, x.copy(), y, mean, var, axis=axis)
    rmean, rvar, _ = ref.moments(x, axis)
    y_inf = ops.batch_normalization(x, rmean, rvar, axis=axis, epsilon=EPS)
    ref.assert_normalized(y_inf, x, rmean, rvar, None, None, axis, EPS)
    m, v = ops.moments(x, axis=axis)
    ref.assert_stats_close(m, v, x, axis)
    np.testing.assert_array_equal(base, saved)


@pytest.mark.parametrize("name", ["reversed-all", "channel-stride-2", "transposed-reversed"])
def test_strided_views_are_not_copied(name):
    # kernels.md: "never silently copy" a strided tensor. NumPy reports its buffer
    # allocations to tracemalloc, so a NumPy-level copy of x would show as a peak of
    # x's size; only the small per-channel arrays may be allocated.
    base = data((64, 128, 128), seed=9)
    x = VIEWS[name](base)
    out = np.empty(x.shape, np.float32)
    mean, var = np.zeros(x.shape[-1]), np.ones(x.shape[-1])
    tracemalloc.start()
    try:
        ops.batch_normalization(x, mean, var, out=out)
        ops.batch_norm_train(x, out=out)
        ops.moments(x)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < x.nbytes // 8, (peak, x.nbytes)


# ---------------------------------------------------------------------------- PyTorch


def test_torch_cpu_tensors_zero_copy(ref):
    torch = pytest.importorskip("torch")
    values = data((16, 8), seed=10)
    t = torch.from_numpy(values.copy())

    y, mean, var = ops.batch_norm_train(t)
    check_train(ref, values, y, mean, var)
    np.testing.assert_array_equal(t.numpy(), values)  # not modified

    # cbn sees the tensor's own memory: a reversed NumPy view of it overlaps it...
    with pytest.raises(ValueError, match="overlap"):
        ops.batch_normalization(t, mean, var, out=t.numpy()[::-1])
    # ...and out= the tensor normalizes it in place.
    ops.batch_norm_train(t, out=t)
    check_train(ref, values, t.numpy(), mean, var)


@pytest.mark.parametrize("view", ["transposed", "sliced", "permuted-NCHW"])
def test_torch_non_contiguous_tensors(ref, view):
    torch = pytest.importorskip("torch")
    base = torch.from_numpy(data((6, 5, 8, 4), seed=11, loc=50.0))
    saved = base.clone()
    if view == "transposed":
        t, axis = base.reshape(30, 32).t(), 0
    elif view == "sliced":
        t, axis = base[:, 1:, ::2, :], -1
    else:
        t, axis = base.permute(0, 3, 1, 2), 1  # NHWC storage seen as NCHW
    assert not t.is_contiguous()
    values = t.numpy().copy()
    y, mean, var = ops.batch_norm_train(t, axis=axis)
    check_train(ref, values, y, mean, var, axis=axis)
    assert torch.equal(base, saved)


@pytest.mark.parametrize("dtype", ["float64", "float16", "int32"])
def test_torch_dtypes_and_masks(ref, dtype):
    torch = pytest.importorskip("torch")
    values = (data((12, 6), seed=12) * 4).astype(dtype)
    t = torch.from_numpy(values.copy())
    mask = torch.from_numpy(np.random.default_rng(13).random(12) < 0.5)
    y, mean, var = ops.batch_norm_train(t, mask=mask)
    check_train(ref, values, y, mean, var, mask=mask.numpy())
