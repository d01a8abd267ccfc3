"""The cache-blocked training forward (issue 3): tensors larger than half the L3 are
normalized in chunks of channels. Small cache sizes make small tensors take that
path; results must match the float64 reference as the one-piece path does."""

from __future__ import annotations

import cbn
import ml_dtypes
import numpy as np
import pytest


@pytest.fixture
def tiny_caches():
    cbn.set_cache_sizes(l2=4096, l3=65536)
    yield
    cbn.set_cache_sizes()


def test_cache_sizes_are_detected_and_overridable():
    l2, l3 = cbn.get_cache_sizes()
    assert l2 > 0 and l3 > 0
    cbn.set_cache_sizes(l2=12345, l3=678910)
    try:
        assert cbn.get_cache_sizes() == (12345, 678910)
        assert cbn.show_config(print_out=False)["cache_l3"] == 678910
        assert cbn.show_config(print_out=False)["cache_from"] == "set by bn_set_cache_bytes"
    finally:
        cbn.set_cache_sizes()
    assert cbn.get_cache_sizes() == (l2, l3)
    with pytest.raises(ValueError, match="l2 must be a positive int"):
        cbn.set_cache_sizes(l2=-1)


def _sysfs_cache(name: str) -> str | None:
    try:
        with open(f"/sys/devices/system/cpu/cpu0/cache/index3/{name}") as f:
            return f.read().strip()
    except OSError:
        return None


def _cpus_in(cpu_list: str) -> int:
    """CPUs in a sysfs list such as '0-1,4'."""
    count = 0
    for part in cpu_list.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


@pytest.mark.skipif(_sysfs_cache("size") is None, reason="no sysfs L3 on this system")
def test_l3_in_use_is_what_sysfs_reports_up_to_16_mib_per_sharing_cpu():
    """A VM reporting its host socket's L3 (300 MiB for 2 vCPUs) must not plan with it."""
    size = _sysfs_cache("size")
    units = {"K": 1 << 10, "M": 1 << 20}
    reported = int(size.rstrip("KM")) * units.get(size[-1], 1)
    sharing = _cpus_in(_sysfs_cache("shared_cpu_list") or "0")
    expected = min(reported, (16 << 20) * sharing)
    assert cbn.get_cache_sizes()[1] == expected
    origin = cbn.show_config(print_out=False)["cache_from"]
    assert origin.startswith("detected ") and "(sysfs)" in origin
    assert ("used as" in origin) == (expected < reported)


CASES = [
    ((16, 12, 12, 64), -1),    # NHWC: 16-channel chunks across rows
    ((16, 64, 12, 12), 1),     # NCHW: chunks of planes
    ((16, 12, 12, 67), -1),    # a last chunk smaller than the others
    ((8, 37, 20, 20), 1),
    ((4000, 40), 1),           # 2-D
]


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16,
                                   np.dtype(ml_dtypes.bfloat16)])
@pytest.mark.parametrize("masked", [False, True])
def test_blocked_training_matches_reference(tiny_caches, ref, shape, axis, dtype, masked):
    rng = np.random.default_rng(abs(hash((shape, masked))) % 2**32)
    x = rng.normal(50.0, 3.0, shape).astype(dtype)
    c = shape[axis]
    gamma, beta = rng.normal(1.0, 0.2, c), rng.normal(0.0, 0.2, c)
    mask = rng.random(shape[:-1]) > 0.3 if masked else None
    y, mean, var = cbn.ops.batch_norm_train(x, gamma=gamma, beta=beta, axis=axis, mask=mask)
    ref.assert_stats_close(mean, var, x, axis, mask)
    m64, v64, _ = ref.moments(x, axis, mask)
    ref.assert_normalized(y, x, m64, v64, gamma, beta, axis, 1e-3)


@pytest.mark.parametrize("shape,axis", CASES[:2])
def test_blocked_views_and_in_place(tiny_caches, ref, shape, axis):
    rng = np.random.default_rng(3)
    base = rng.normal(-7.0, 2.0, (shape[0] * 2,) + shape[1:]).astype(np.float32)
    x = base[::-2]  # reversed, strided batch
    expected_x = x.copy()
    y, mean, var = cbn.ops.batch_norm_train(x, axis=axis, out=x)
    assert y is x
    ref.assert_stats_close(mean, var, expected_x, axis)
    m64, v64, _ = ref.moments(expected_x, axis)
    ref.assert_normalized(y, expected_x, m64, v64, None, None, axis, 1e-3)


def test_blocked_broadcast_mask(tiny_caches, ref):
    rng = np.random.default_rng(4)
    x = rng.normal(0.0, 1.0, (16, 64, 12, 12)).astype(np.float32)
    mask = rng.random((16, 1, 12, 1)) > 0.5  # broadcast over the channels
    y, mean, var = cbn.ops.batch_norm_train(x, axis=1, mask=mask)
    ref.assert_stats_close(mean, var, x, 1, mask)


def _reference_backward(dy, x, mean, var, gamma, axis, eps, mask, training):
    """dx, dgamma, dbeta in float64, written out from the formula."""
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    cshape = [1] * x.ndim
    cshape[axis] = x.shape[axis]
    dy64, x64 = dy.astype(np.float64), x.astype(np.float64)
    m, v, g = (np.reshape(a, cshape) for a in (mean, var, gamma))
    s = 1.0 / np.sqrt(v + eps)
    xhat = (x64 - m) * s
    sum_dy, sum_dy_xhat = dy64.sum(axes, keepdims=True), (dy64 * xhat).sum(axes, keepdims=True)
    if not training:
        return g * s * dy64, sum_dy_xhat.ravel(), sum_dy.ravel()
    w = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(np.float64)
    n = w.sum(axes, keepdims=True)
    dx = g * s * (dy64 - w / n * (sum_dy + xhat * sum_dy_xhat))
    return dx, sum_dy_xhat.ravel(), sum_dy.ravel()


@pytest.fixture
def backward_caches():
    """A 256 KiB 'L3': x and dy of every case below (over 128 KiB together) are cut into
    chunks of channels (each channel's x and dy, at most 26 KiB, under a quarter of it)."""
    cbn.set_cache_sizes(l2=4096, l3=1 << 18)
    yield
    cbn.set_cache_sizes()


@pytest.mark.parametrize("shape,axis", [((16, 64, 12, 12), 1), ((8, 37, 20, 20), 1),
                                        ((4000, 40), 0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.dtype(ml_dtypes.bfloat16)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_blocked_backward_matches_reference(backward_caches, shape, axis, dtype, masked, training):
    """A backward of channels-first tensors above half the L3 runs in chunks of channels
    (sums, then dx while cached) when it has more than one thread, else in two passes:
    same values as the formula in float64 either way."""
    rng = np.random.default_rng(abs(hash((shape, masked))) % 2**32)
    x = rng.normal(50.0, 3.0, shape).astype(dtype)
    dy = rng.normal(0.5, 1.0, shape).astype(dtype)
    c = shape[axis]
    gamma = rng.normal(1.0, 0.2, c)
    mask_shape = tuple(1 if i == axis else n for i, n in enumerate(shape))
    mask = rng.random(mask_shape) > 0.3 if masked else None
    _, mean, var = cbn.ops.batch_norm_train(x, axis=axis, mask=mask, epsilon=1e-3)
    dx, dgamma, dbeta = cbn.ops.batch_norm_backward(dy, x, mean, var, gamma=gamma, axis=axis,
                                                    mask=mask, training=training)
    ref_dx, ref_dgamma, ref_dbeta = _reference_backward(dy, x, mean, var, gamma, axis, 1e-3,
                                                        mask, training)
    unit = np.finfo(np.float32).eps if dtype != np.float64 else np.finfo(np.float64).eps
    if dtype == np.dtype(ml_dtypes.bfloat16):
        unit = 2.0**-8
    scale = np.abs(ref_dx).max()
    np.testing.assert_allclose(dx.astype(np.float64), ref_dx, rtol=0, atol=64 * unit * scale)
    # The sums run in short float32 blocks (float64 for float64 data) added in float64.
    sums_unit = np.finfo(np.float64 if dtype == np.float64 else np.float32).eps
    dy_scale = np.abs(dy.astype(np.float64)).sum() / c
    np.testing.assert_allclose(dbeta, ref_dbeta, rtol=0, atol=64 * sums_unit * dy_scale)
    np.testing.assert_allclose(dgamma, ref_dgamma, rtol=0, atol=64 * sums_unit * dy_scale * 4)


def test_blocked_backward_in_place_over_dy(backward_caches):
    rng = np.random.default_rng(8)
    x = rng.normal(0.0, 1.0, (16, 64, 12, 12)).astype(np.float32)
    dy = rng.normal(0.0, 1.0, x.shape).astype(np.float32)
    _, mean, var = cbn.ops.batch_norm_train(x, axis=1)
    expected, _, _ = _reference_backward(dy, x, mean, var, np.ones(64), 1, 1e-3, None, True)
    dx, _, _ = cbn.ops.batch_norm_backward(dy, x, mean, var, axis=1, out=dy)
    assert dx is dy
    np.testing.assert_allclose(dx, expected, rtol=0, atol=1e-5)


# Inference outputs are written with streaming (non-temporal) stores once x and
# y together fill the L3 (and the other threads' L2s), on aligned vectors only:
# back-to-back rows on a misaligned output are walked from its first aligned
# element with their channels rotated, other misaligned rows fall back to plain
# stores, planes store up to the first aligned element (all of them when the
# output is not even aligned to its element size). A one-element and a one-byte
# offset into the output buffer exercise these; a 2 KB "L3" makes every case
# stream.
@pytest.fixture
def streaming_outputs():
    cbn.set_cache_sizes(l2=1024, l3=2048)
    yield
    cbn.set_cache_sizes()


STREAM_CASES = [
    ((8, 12, 12, 64), -1),   # rows x C, whole runs of rows
    ((8, 12, 12, 17), -1),   # odd C: a scalar tail per row
    ((6, 5, 37, 3), 1),      # odd plane length: aligned head, vectors, tail
    ((6, 40, 9, 9), 1),
]


@pytest.mark.parametrize("shape,axis", STREAM_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16,
                                   np.dtype(ml_dtypes.bfloat16)])
@pytest.mark.parametrize("offset", ["none", "element", "byte"])
def test_streamed_inference_output_matches_reference(streaming_outputs, ref, shape, axis, dtype,
                                                     offset):
    rng = np.random.default_rng(abs(hash((shape, offset))) % 2**32)
    x = rng.normal(20.0, 4.0, shape).astype(dtype)
    c = shape[axis]
    mean, var = rng.normal(20.0, 1.0, c), rng.uniform(9.0, 20.0, c)
    gamma, beta = rng.normal(1.0, 0.2, c), rng.normal(0.0, 0.2, c)
    size = x.dtype.itemsize
    buffer = np.full(x.nbytes + size, 0xA5, np.uint8)
    skip = {"none": 0, "element": size, "byte": 1}[offset]
    out = buffer[skip:skip + x.nbytes].view(dtype).reshape(shape)
    y = cbn.ops.batch_normalization(x, mean, var, gamma=gamma, beta=beta, axis=axis, out=out)
    assert y is out
    ref.assert_normalized(y, x, mean, var, gamma, beta, axis, 1e-3)
    # nothing written outside the output
    untouched = np.r_[buffer[:skip], buffer[skip + x.nbytes:]]
    assert np.all(untouched == 0xA5)


# Rows x C normalize: tiles of channels keep their parameters in registers; wide
# rows go in blocks of 4 rows (prefetching the next block unless x is in L2), or
# row by row from memory while their parameters fit in L1 (255 channels; 700
# do not). Wide odd rows take whole tiles, a part tile and a scalar tail; row
# counts are not multiples of the block.
@pytest.mark.parametrize("caches", [None, (1024, 1 << 30), (1024, 2048)],
                         ids=["in-L2", "in-L3", "from-memory"])
@pytest.mark.parametrize("shape", [(19, 255), (3, 7, 130), (2, 11, 520), (9, 700)])
@pytest.mark.parametrize("in_place", [False, True])
def test_rows_tiles_match_reference(ref, caches, shape, in_place):
    cbn.set_cache_sizes(*(caches or ()))
    try:
        rng = np.random.default_rng(sum(shape))
        x = rng.normal(-4.0, 3.0, shape).astype(np.float32)
        expected_x = x.copy()
        c = shape[-1]
        mean, var = rng.normal(-4.0, 1.0, c), rng.uniform(4.0, 12.0, c)
        gamma, beta = rng.normal(1.0, 0.3, c), rng.normal(0.0, 0.3, c)
        y = cbn.ops.batch_normalization(x, mean, var, gamma=gamma, beta=beta, axis=-1,
                                        out=x if in_place else None)
    finally:
        cbn.set_cache_sizes()
    ref.assert_normalized(y, expected_x, mean, var, gamma, beta, -1, 1e-3)


# Rows x C moments: rows one tile spans go in memory order; wider rows go in
# tiles down blocks of rows, or one row at a time when x comes from memory (the
# sums of a double-width tile in registers, where the row is that wide, the
# rest in memory). 255 channels leave a part tile and a scalar tail; 256 float32
# channels are one double-width tile exactly; 2100 channels take two channel
# chunks (2048 + 52). The mean is 1e4 standard deviations for
# float32/float64 (the shifted sums keep the variance accurate there).
@pytest.mark.parametrize("caches", [None, (1024, 1 << 30), (1024, 2048)],
                         ids=["in-L2", "in-L3", "from-memory"])
@pytest.mark.parametrize("shape", [(37, 255), (5, 9, 256), (3, 5, 700), (40, 2100)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16,
                                   np.dtype(ml_dtypes.bfloat16)])
def test_rows_moments_match_reference(ref, caches, shape, dtype):
    rng = np.random.default_rng(sum(shape))
    wide = dtype in (np.float32, np.float64)
    centre = rng.uniform(-3e4, 3e4, shape[-1]) if wide else rng.uniform(-40.0, 40.0, shape[-1])
    x = (centre + rng.normal(0.0, 3.0, shape)).astype(dtype)
    cbn.set_cache_sizes(*(caches or ()))
    try:
        mean, var = cbn.ops.moments(x, axis=-1)
    finally:
        cbn.set_cache_sizes()
    ref.assert_stats_close(mean, var, x, -1)


# Rows of few channels are folded into one run that repeats the channels; its
# statistics walk super rows, sum each position over super blocks of up to 1024
# super rows, and add up a channel's positions before each merge (R4.2). 150001
# rows give each thread more than one super block and leave a rest shorter than
# a super row; the mean drifts along the rows, so the shift must follow it.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("channels", [1, 3, 5, 16])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16,
                                   np.dtype(ml_dtypes.bfloat16)])
def test_folded_rows_moments_match_reference(ref, threads, channels, dtype):
    rng = np.random.default_rng(channels)
    rows = 150001
    wide = dtype in (np.float32, np.float64)
    centre = rng.uniform(-3e4, 3e4, channels) if wide else rng.uniform(-40.0, 40.0, channels)
    drift = np.linspace(0.0, 120.0 if wide else 4.0, rows)[:, None]
    x = (centre + drift + rng.normal(0.0, 3.0, (rows, channels))).astype(dtype)
    cbn.set_num_threads(threads)
    try:
        mean, var = cbn.ops.moments(x, axis=-1)
    finally:
        cbn.set_num_threads(0)
    ref.assert_stats_close(mean, var, x, -1)
