"""Property tests of ``cbn.ops`` against the float64 NumPy reference in conftest.py.

Random ranks 1-5, sizes including 1 and 0, negative axes and axis lists, contiguous,
transposed, strided, reversed (negative stride) and broadcast (stride 0) views, both mask
forms of R8.1, every input dtype of R7.1, and ``out=`` buffers (fresh, strided, in place),
each with 1 and 2 threads. Then the accuracy targets at large mean/std (R4.2) and the
agreement of results across thread counts on tensors large enough to run in parallel.
"""

from __future__ import annotations

import dataclasses

import cbn
import ml_dtypes
import numpy as np
import pytest
from cbn import ops
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

BF16 = np.dtype(ml_dtypes.bfloat16)
FLOAT_DTYPES = [np.dtype(t) for t in (np.float16, np.float32, np.float64)] + [BF16]
INT_DTYPES = [np.dtype(t) for t in (np.int8, np.uint8, np.int32, np.int64, np.bool_)]
ALL_DTYPES = FLOAT_DTYPES + INT_DTYPES
SIZES = [1, 2, 3, 4, 5, 7, 8, 17, 33]
MAX_ELEMENTS = 6000

PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(autouse=True, scope="module")
def _restore_threads():
    yield
    cbn.set_num_threads(0)


# ---------------------------------------------------------------------------- data


def random_values(rng, shape, dtype, loc, scale, kind) -> np.ndarray:
    """Values of ``dtype``: normal around ``loc``, a few distinct levels, or constant."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -100), min(info.max, 200), size=shape).astype(dtype)
    if kind == "normal":
        v = loc + scale * rng.standard_normal(shape)
    elif kind == "levels":
        v = loc + scale * rng.integers(-2, 3, size=shape)
    else:
        v = np.full(shape, loc + scale * 0.37)
    return v.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a view of a given shape sits in memory: the axis order in memory,
    reversed axes (negative strides), slicing steps, and broadcast (stride-0) axes."""

    perm: tuple[int, ...]
    flips: tuple[bool, ...]
    steps: tuple[int, ...]
    broadcast: tuple[bool, ...]


def make_array(shape, layout: Layout, fill) -> np.ndarray:
    """A view of ``shape`` laid out as ``layout``; ``fill(shape)`` makes the backing buffer."""
    base_shape = tuple(1 if b else s for s, b in zip(shape, layout.broadcast, strict=True))
    mem_shape = [base_shape[p] * layout.steps[p] for p in layout.perm]
    buf = fill(tuple(mem_shape))
    v = buf[tuple(slice(None, None, layout.steps[p]) for p in layout.perm)]
    v = v.transpose(np.argsort(layout.perm))
    v = v[tuple(slice(None, None, -1) if f else slice(None) for f in layout.flips)]
    if any(layout.broadcast):
        v = np.broadcast_to(v, shape)
    return v


@st.composite
def layouts(draw, rank: int, allow_broadcast: bool = True) -> Layout:
    perm = tuple(draw(st.permutations(range(rank))))
    flips = tuple(draw(st.lists(st.booleans(), min_size=rank, max_size=rank)))
    steps = tuple(draw(st.lists(st.sampled_from([1, 1, 2, 3]), min_size=rank, max_size=rank)))
    bcast = (False,) * rank
    if allow_broadcast and draw(st.integers(0, 4)) == 0:
        bcast = tuple(draw(st.lists(st.booleans(), min_size=rank, max_size=rank)))
    return Layout(perm, flips, steps, bcast)


@st.composite
def shapes(draw) -> tuple[int, ...]:
    rank = draw(st.integers(1, 5))
    shape = list(draw(st.lists(st.sampled_from(SIZES), min_size=rank, max_size=rank)))
    while int(np.prod(shape)) > MAX_ELEMENTS:
        shape[int(np.argmax(shape))] //= 2
    if draw(st.integers(0, 7)) == 0:  # an empty tensor
        shape[draw(st.integers(0, rank - 1))] = 0
    return tuple(shape)


@st.composite
def axis_args(draw, rank: int):
    """Channel axes as the caller may write them: int, NumPy int, list or tuple, any sign."""
    axes = draw(st.lists(st.integers(0, rank - 1), min_size=1, max_size=rank, unique=True))
    axes = [a - rank if draw(st.booleans()) else a for a in axes]
    form = draw(st.sampled_from(["int", "np.int64", "list", "tuple"]))
    if len(axes) == 1 and form == "int":
        return axes[0]
    if len(axes) == 1 and form == "np.int64":
        return np.int64(axes[0])
    return tuple(axes) if form == "tuple" else list(axes)


@st.composite
def masks(draw, shape, rng):
    """None, or a random mask in form (a) or (b) of R8.1, of a random dtype; sometimes all 0."""
    rank = len(shape)
    form = draw(st.sampled_from(["none", "a", "b"] if rank >= 2 else ["none", "b"]))
    if form == "none":
        return None
    if form == "a":
        mshape = shape[:-1]
    else:
        ones = draw(st.lists(st.booleans(), min_size=rank, max_size=rank))
        mshape = tuple(1 if o else s for s, o in zip(shape, ones, strict=True))
    p_used = draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
    used = rng.random(mshape) < p_used
    dtype = draw(st.sampled_from([np.bool_, np.uint8, np.int32, np.float64]))
    values = used.astype(dtype)
    if dtype == np.int32:  # non-zero means "use", whatever the value (R8.1)
        values = values * rng.integers(1, 5, size=mshape, dtype=np.int32)
    return values


@dataclasses.dataclass
class Case:
    x: np.ndarray
    axis: object
    mask: np.ndarray | None
    layout: Layout
    rng: np.random.Generator

    @property
    def writeable_float(self) -> bool:
        return self.x.flags.writeable and self.x.dtype in FLOAT_DTYPES


@st.composite
def cases(draw, dtypes=ALL_DTYPES, with_mask: bool = True) -> Case:
    shape = draw(shapes())
    rank = len(shape)
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    sixteen = dtype in (np.dtype(np.float16), BF16)
    loc = draw(st.sampled_from([0.0, 1.0, -3.0, 100.0] if sixteen else [0.0, 1.0, -3.0, 1e3]))
    scale = draw(st.sampled_from([1.0, 0.1, 10.0] if sixteen else [1.0, 0.01, 100.0]))
    kind = draw(st.sampled_from(["normal", "normal", "levels", "constant"]))
    layout = draw(layouts(rank))
    x = make_array(shape, layout, lambda s: random_values(rng, s, dtype, loc, scale, kind))
    axis = draw(axis_args(rank))
    mask = draw(masks(shape, rng)) if with_mask else None
    return Case(x, axis, mask, layout, rng)


def random_param(rng, x, axis, ref, low, high, form):
    """A per-channel parameter in the channel shape, or padded with size-1 dims to the
    input's rank (the keepdims form), as float32 or float64."""
    axes = ref.channel_axes(axis, x.ndim)
    cshape = tuple(x.shape[a] for a in axes)
    v = rng.uniform(low, high, size=cshape)
    if form == "keepdims":
        v = np.expand_dims(v, ref.reduction_axes(axes, x.ndim))
    return v.astype(rng.choice([np.float32, np.float64]))


@st.composite
def out_kinds(draw, case: Case):
    """None, a fresh contiguous array, a strided/reversed view, or the input itself."""
    kinds = ["none", "fresh", "strided"] + (["inplace"] if case.writeable_float else [])
    return draw(st.sampled_from(kinds)), draw(layouts(case.x.ndim, allow_broadcast=False))


def make_out(kind, layout, x, ref):
    if kind == "none":
        return None
    if kind == "inplace":
        return x
    odt = ref.output_dtype(x.dtype)
    if kind == "fresh":
        return np.full(x.shape, np.nan, dtype=odt)
    return make_array(x.shape, layout, lambda s: np.full(s, np.nan, dtype=odt))


# ---------------------------------------------------------------------------- properties


@pytest.mark.parametrize("threads", [1, 2])
@PROPERTY_SETTINGS
@given(case=cases())
def test_moments_match_reference(ref, threads, case):
    # R4.1 biased moments per channel; R8.1-R8.3 masks; R7.1 dtypes; stats dtype per ops.
    cbn.set_num_threads(threads)
    before = case.x.copy()
    mean, var = ops.moments(case.x, axis=case.axis, mask=case.mask)
    ref.assert_stats_close(mean, var, case.x, case.axis, case.mask)
    np.testing.assert_array_equal(case.x, before)  # input untouched


@pytest.mark.parametrize("threads", [1, 2])
@PROPERTY_SETTINGS
@given(case=cases(), data=st.data())
def test_batch_norm_train_matches_reference(ref, threads, case, data):
    # R4 batch statistics, R6 output (every position, masked ones too: R8.4), R8 masks.
    cbn.set_num_threads(threads)
    x, axis, rng = case.x, case.axis, case.rng
    gamma = data.draw(st.sampled_from([None, "channel", "keepdims"]))
    beta = data.draw(st.sampled_from([None, "channel", "keepdims"]))
    gamma = gamma and random_param(rng, x, axis, ref, -2.0, 2.0, gamma)
    beta = beta and random_param(rng, x, axis, ref, -5.0, 5.0, beta)
    eps = data.draw(st.sampled_from([1e-3, 1e-5, 0.5]))
    out_kind, out_layout = data.draw(out_kinds(case))
    out = make_out(out_kind, out_layout, x, ref)
    before = x.copy()

    y, mean, var = ops.batch_norm_train(
        x, gamma=gamma, beta=beta, axis=axis, epsilon=eps, mask=case.mask, out=out
    )

    ref.assert_stats_close(mean, var, before, axis, case.mask)
    rmean, rvar, _ = ref.moments(before, axis, case.mask)
    ref.assert_normalized(y, before, rmean, rvar, gamma, beta, axis, eps)
    if out is not None:
        assert y is out
    if out_kind != "inplace":
        np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("threads", [1, 2])
@PROPERTY_SETTINGS
@given(case=cases(with_mask=False), data=st.data())
def test_batch_normalization_matches_reference(ref, threads, case, data):
    # R6 with given statistics (inference); params in the channel or keepdims shape.
    cbn.set_num_threads(threads)
    x, axis, rng = case.x, case.axis, case.rng
    form = data.draw(st.sampled_from(["channel", "keepdims"]))
    mean = random_param(rng, x, axis, ref, -3.0, 3.0, form)
    var = random_param(rng, x, axis, ref, 0.0, 9.0, form)
    if data.draw(st.booleans()):
        var = np.zeros_like(var)  # zero variance: the output is beta + gamma*(x-mean)/sqrt(eps)
    gamma = data.draw(st.sampled_from([None, form]))
    gamma = gamma and random_param(rng, x, axis, ref, -2.0, 2.0, form)
    beta = data.draw(st.sampled_from([None, form]))
    beta = beta and random_param(rng, x, axis, ref, -5.0, 5.0, form)
    eps = data.draw(st.sampled_from([1e-3, 1e-5, 0.5]))
    out_kind, out_layout = data.draw(out_kinds(case))
    out = make_out(out_kind, out_layout, x, ref)
    before = x.copy()

    y = ops.batch_normalization(
        x, mean, var, gamma=gamma, beta=beta, axis=axis, epsilon=eps, out=out
    )

    ref.assert_normalized(y, before, mean, var, gamma, beta, axis, eps)
    if out is not None:
        assert y is out
    if out_kind != "inplace":
        np.testing.assert_array_equal(x, before)


# ---------------------------------------------------------------------------- targeted cases


def test_empty_tensor_statistics_are_zero(ref):
    # R8.3: a channel with no position at all has mean 0, variance 0; output stays empty.
    x = np.empty((0, 5), dtype=np.float32)
    y, mean, var = ops.batch_norm_train(x, axis=-1)
    assert y.shape == (0, 5) and y.dtype == np.float32
    np.testing.assert_array_equal(mean, np.zeros(5, np.float32))
    np.testing.assert_array_equal(var, np.zeros(5, np.float32))
    mean, var = ops.moments(np.empty((3, 0), dtype=np.float64), axis=-1)
    assert mean.shape == (0,) and var.shape == (0,) and mean.dtype == np.float64


def test_single_position_gives_beta(ref):
    # R4.1: with n = 1 the variance is 0 and the output is exactly beta.
    x = np.array([[3.5, -1.25, 1e4]], dtype=np.float32)
    beta = np.array([0.5, -2.0, 7.0])
    y, mean, var = ops.batch_norm_train(x, beta=beta, gamma=np.array([2.0, 3.0, 4.0]))
    np.testing.assert_array_equal(var, np.zeros(3, np.float32))
    np.testing.assert_array_equal(mean, x[0])
    np.testing.assert_array_equal(y, beta[None, :].astype(np.float32))


def test_fully_masked_channel_and_masked_positions_normalized(ref):
    # R8.3 an unused channel gets (0, 0); R8.4 masked positions are still normalized.
    rng = np.random.default_rng(7)
    x = rng.normal(5.0, 2.0, size=(6, 4, 3)).astype(np.float32)
    mask = np.ones((1, 4, 3), dtype=bool)
    mask[:, :, 1] = False  # channel 1 of axis -1 is never used
    mask[:, 2, 0] = False
    y, mean, var = ops.batch_norm_train(x, axis=-1, mask=mask, epsilon=1e-3)
    assert mean[1] == 0 and var[1] == 0
    rmean, rvar, _ = ref.moments(x, -1, mask)
    ref.assert_normalized(y, x, rmean, rvar, None, None, -1, 1e-3)
    np.testing.assert_allclose(y[..., 1], x[..., 1] / np.sqrt(1e-3), rtol=1e-6)


def test_mask_form_a_is_the_keras_rule(ref):
    # R8.1 (a): a (B, T) mask for a (B, T, F) input selects whole time steps.
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 9, 5))
    mask = rng.random((4, 9)) < 0.5
    mean, var = ops.moments(x, axis=-1, mask=mask)
    sel = x[mask]  # (used steps, F)
    np.testing.assert_allclose(mean, sel.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(var, sel.var(axis=0), rtol=1e-12)


def test_in_place_on_a_reversed_view(ref):
    # out=x with a negative-stride view normalizes in place; the rest of the buffer is untouched.
    rng = np.random.default_rng(11)
    buf = rng.normal(2.0, 3.0, size=(40, 16)).astype(np.float32)
    saved = buf.copy()
    x = buf[::-1, ::-2]
    before = x.copy()
    y, mean, var = ops.batch_norm_train(x, axis=-1, out=x)
    assert y is x
    rmean, rvar, _ = ref.moments(before, -1)
    ref.assert_normalized(buf[::-1, ::-2], before, rmean, rvar, None, None, -1, 1e-3)
    np.testing.assert_array_equal(buf[:, 0::2], saved[:, 0::2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels", [1, 64, 65, 300])
@pytest.mark.parametrize("out_kind", ["none", "fresh", "inplace"])
def test_common_calls_at_every_channel_count(ref, dtype, channels, out_kind):
    # R4, R6: the plain call (ndarray, int axis, 1-D parameters, no mask) for channel
    # counts on both sides of the binding's stack buffer of 64 channels' parameters.
    rng = np.random.default_rng(channels)
    x = rng.normal(5.0, 2.0, size=(7, channels)).astype(dtype)
    gamma = rng.uniform(-2.0, 2.0, channels).astype(np.float32)
    beta = rng.uniform(-5.0, 5.0, channels)
    mean, var = rng.normal(size=channels), rng.uniform(0.5, 2.0, channels).astype(np.float32)
    before = x.copy()
    rmean, rvar, _ = ref.moments(before, -1)
    for call, stats in (
        (lambda out: ops.batch_norm_train(x, gamma=gamma, beta=beta, epsilon=1e-3, out=out),
         (rmean, rvar)),
        (lambda out: (ops.batch_normalization(x, mean, var, gamma=gamma, beta=beta,
                                              epsilon=1e-3, out=out),), (mean, var)),
    ):
        x[...] = before
        out = make_out(out_kind, None, x, ref)
        y, *returned = call(out)
        if returned:
            ref.assert_stats_close(*returned, before, -1)
        ref.assert_normalized(y, before, *stats, gamma, beta, -1, 1e-3)
        assert y.dtype == dtype and (out is None or y is out)


# ---------------------------------------------------------------------------- accuracy (R4.2)


def large_mean_data(ratio, shape, seed=0):
    """float32 data whose per-channel mean/std is ``ratio`` (std 3.7)."""
    rng = np.random.default_rng(seed)
    std = 3.7
    return (ratio * std + std * rng.standard_normal(shape)).astype(np.float32)


ACCURACY_LAYOUTS = [
    pytest.param((4096, 8), -1, id="rows-x-C"),
    pytest.param((130, 40), -1, id="rows-x-C-few-rows"),
    pytest.param((8, 4, 48, 48), 1, id="NCHW"),
    pytest.param((6, 40, 40, 3), [1, 3], id="axis-list"),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("ratio", [1e4, 1e5])
@pytest.mark.parametrize("shape, axis", ACCURACY_LAYOUTS)
@pytest.mark.parametrize("masked", [False, True])
def test_accuracy_at_large_mean(ref, threads, ratio, shape, axis, masked):
    # R4.2: variance within 1e-6 relative, output within 4 float32 ulp of the float64
    # reference of the same float32 data, at mean/std = 1e4 and 1e5.
    cbn.set_num_threads(threads)
    x = large_mean_data(ratio, shape)
    mask = None
    if masked:
        mask = np.random.default_rng(1).random(shape[:-1]) < 0.7  # form (a)
    cshape = [shape[a] for a in ref.channel_axes(axis, len(shape))]
    gamma = np.linspace(0.5, 2.0, int(np.prod(cshape))).reshape(cshape)
    y, mean, var = ops.batch_norm_train(x, gamma=gamma, axis=axis, mask=mask, epsilon=1e-3)
    rmean, rvar, _ = ref.moments(x, axis, mask)
    np.testing.assert_array_less(np.abs(var.astype(np.float64) - rvar), 1e-6 * rvar)
    np.testing.assert_array_less(np.abs(mean.astype(np.float64) - rmean), 2.0**-24 * np.abs(rmean)
                                 + 1e-6 * np.sqrt(rvar))
    y_ref = ref.normalize(x, rmean, rvar, gamma, None, axis, 1e-3)
    err = np.abs(y.astype(np.float64) - y_ref)
    assert np.all(err <= 4 * 2.0**-23 * np.maximum(1.0, np.abs(y_ref))), err.max()

    # Inference with float64 statistics (the moving statistics path).
    y_inf = ops.batch_normalization(x, rmean, rvar, gamma=gamma, axis=axis, epsilon=1e-3)
    err = np.abs(y_inf.astype(np.float64) - y_ref)
    assert np.all(err <= 4 * 2.0**-23 * np.maximum(1.0, np.abs(y_ref))), err.max()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("masked", [False, True])
def test_accuracy_on_long_drifting_planes(ref, threads, dtype, masked):
    # R4.2 on channels-first planes long enough (9·1024 + 37 elements) that several
    # groups of blocks share one shift, at mean/std = 1e4 with a drift of 40 std along
    # every plane: a shift that stopped following the mean would lose digits.
    cbn.set_num_threads(threads)
    rng = np.random.default_rng(7)
    std, length = 3.7, 9 * 1024 + 37
    drift = np.linspace(0.0, 40 * std, length)
    x = (1e4 * std + drift + std * rng.standard_normal((3, 4, length))).astype(dtype)
    mask = rng.random(x.shape) < 0.6 if masked else None  # per element: partly used blocks
    _, mean, var = ops.batch_norm_train(x, axis=1, mask=mask)
    rmean, rvar, _ = ref.moments(x, 1, mask)
    np.testing.assert_array_less(np.abs(var.astype(np.float64) - rvar), 1e-6 * rvar)
    np.testing.assert_array_less(np.abs(mean.astype(np.float64) - rmean), 2.0**-24 * np.abs(rmean)
                                 + 1e-6 * np.sqrt(rvar))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("channels", [3, 16])
@pytest.mark.parametrize("masked", [False, True])
def test_accuracy_on_few_channel_rows(ref, threads, channels, masked):
    # R4.2 on channels-last rows of few channels, which the core folds into one run
    # whose columns repeat the channels, at mean/std = 1e4; a mask per element makes
    # every column of a channel count different positions.
    cbn.set_num_threads(threads)
    shape = (16, 40, 40, channels)
    x = large_mean_data(1e4, shape)
    mask = np.random.default_rng(3).random(shape) < 0.6 if masked else None
    y, mean, var = ops.batch_norm_train(x, axis=-1, mask=mask, epsilon=1e-3)
    rmean, rvar, _ = ref.moments(x, -1, mask)
    np.testing.assert_array_less(np.abs(var.astype(np.float64) - rvar), 1e-6 * rvar)
    np.testing.assert_array_less(np.abs(mean.astype(np.float64) - rmean), 2.0**-24 * np.abs(rmean)
                                 + 1e-6 * np.sqrt(rvar))
    y_ref = ref.normalize(x, rmean, rvar, None, None, -1, 1e-3)
    err = np.abs(y.astype(np.float64) - y_ref)
    assert np.all(err <= 4 * 2.0**-23 * np.maximum(1.0, np.abs(y_ref))), err.max()


# ---------------------------------------------------------------------------- thread counts


def _big_views():
    rng = np.random.default_rng(5)
    nhwc = rng.normal(10.0, 2.0, size=(16, 24, 24, 40)).astype(np.float32)
    nchw = rng.normal(-3.0, 0.5, size=(16, 24, 24, 24)).astype(np.float32)
    f64 = rng.normal(1e3, 1.0, size=(3000, 70))
    bf16 = rng.normal(1.0, 4.0, size=(2000, 130)).astype(ml_dtypes.bfloat16)
    mask_a = rng.random((16, 24, 24)) < 0.6
    return [
        pytest.param(nhwc, -1, None, id="NHWC"),
        pytest.param(nhwc, -1, mask_a, id="NHWC-masked"),
        pytest.param(nchw, 1, None, id="NCHW"),
        pytest.param(nchw.transpose(0, 2, 3, 1)[:, ::-1], -1, None, id="NCHW-as-NHWC-reversed"),
        pytest.param(nhwc[:, ::2, ::-1, :], [1, 3], mask_a[:, ::2, ::-1], id="axis-list-strided"),
        pytest.param(f64[::-1].T, 0, None, id="float64-transposed"),
        pytest.param(bf16, -1, None, id="bfloat16"),
    ]


@pytest.mark.parametrize("x, axis, mask", _big_views())
def test_results_agree_across_thread_counts(ref, x, axis, mask):
    # kernels.md: parallel runs give the serial results up to rounding, and a fixed thread
    # count gives the same bits every time (partials merged in a fixed order).
    results = {}
    for threads in (1, 2):
        cbn.set_num_threads(threads)
        y, mean, var = ops.batch_norm_train(x, axis=axis, mask=mask)
        ref.assert_stats_close(mean, var, x, axis, mask)
        rmean, rvar, _ = ref.moments(x, axis, mask)
        ref.assert_normalized(y, x, rmean, rvar, None, None, axis, 1e-3)
        y_inf = ops.batch_normalization(x, rmean, rvar, axis=axis)
        ref.assert_normalized(y_inf, x, rmean, rvar, None, None, axis, 1e-3)
        results[threads] = (y, mean, var)
    y1, m1, v1 = results[1]
    y2, m2, v2 = results[2]
    np.testing.assert_allclose(m2, m1, rtol=1e-6, atol=1e-6 * float(np.sqrt(v1.max())))
    np.testing.assert_allclose(v2, v1, rtol=1e-6)
    slack = ref.mean_slack(x, m1, v1, None, axis, 1e-3)
    ref.assert_output_close(y2, y1.astype(np.float64), axis, x.dtype, slack=slack)
    again = ops.batch_norm_train(x, axis=axis, mask=mask)
    for a, b in zip(again, results[2], strict=True):
        np.testing.assert_array_equal(a, b)
