"""cbn.ops.batch_norm_backward (spec R15) against a float64 closed form written here,
float64 finite differences of a NumPy forward, and PyTorch autograd (float64)."""

from __future__ import annotations

import cbn
import ml_dtypes
import numpy as np
import pytest
from reference import numeric_grad

BF16 = np.dtype(ml_dtypes.bfloat16)
EPS = 1e-3


def reduced(axes, rank):
    return tuple(i for i in range(rank) if i not in axes)


def forward64(x, gamma, beta, axes, mask, eps, mean=None, var=None):
    """R4/R6/R8 in float64: y of every position, statistics over the used ones."""
    red = reduced(axes, x.ndim)
    w = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(float)
    n = w.sum(red, keepdims=True)
    if mean is None:
        mean = (w * x).sum(red, keepdims=True) / n
        var = (w * (x - mean) ** 2).sum(red, keepdims=True) / n
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def backward64(dy, x, gamma, axes, mask, eps, training):
    """The closed form: dx = γ·s·(dy − w/N·(Σdy + x̂·Σdy·x̂)) in training, γ·s·dy with
    fixed statistics; dγ = Σdy·x̂, dβ = Σdy over every position."""
    red = reduced(axes, x.ndim)
    w = np.ones(x.shape) if mask is None else np.broadcast_to(mask, x.shape).astype(float)
    n = w.sum(red, keepdims=True)
    mean = (w * x).sum(red, keepdims=True) / n
    var = (w * (x - mean) ** 2).sum(red, keepdims=True) / n
    s = 1 / np.sqrt(var + eps)
    xhat = (x - mean) * s
    sum_dy = dy.sum(red, keepdims=True)
    sum_dy_xhat = (dy * xhat).sum(red, keepdims=True)
    dx = gamma * s * dy
    if training:
        dx = dx - gamma * s * w / n * (sum_dy + xhat * sum_dy_xhat)
    return dx, sum_dy_xhat, sum_dy, mean, var


def channel_view(v, shape, axes):
    """A (..., C)-shaped per-channel array broadcast against x."""
    return v.reshape([shape[i] if i in axes else 1 for i in range(len(shape))])


def make_case(rng, shape, axes, dtype, masked, loc=3.0):
    x = rng.normal(loc, 2.0, shape).astype(dtype)
    dy = rng.normal(0.0, 1.0, shape).astype(dtype)
    cshape = [shape[a] for a in axes]
    gamma = rng.normal(1.0, 0.3, cshape)
    mask = None
    if masked:
        mask = rng.random(shape[:-1]) > 0.3
        mask.reshape(-1)[0] = True
    return x, dy, gamma, mask


def check_against_closed_form(x, dy, gamma, axes, mask, training, dtype, out=None):
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    mask_full = None if mask is None else mask[..., np.newaxis]
    g = channel_view(gamma, x.shape, axes)
    dx_ref, dg_ref, db_ref, mean, var = backward64(dy64, x64, g, axes, mask_full, EPS, training)
    cshape = tuple(x.shape[a] for a in axes)
    dx, dgamma, dbeta = cbn.ops.batch_norm_backward(
        dy, x, mean.reshape(cshape), var.reshape(cshape), gamma=gamma, axis=list(axes),
        epsilon=EPS, mask=mask, training=training, out=out,
    )
    assert dx.dtype == x.dtype and dx.shape == x.shape
    stats_dtype = np.float64 if x.dtype == np.float64 else np.float32
    assert dgamma.dtype == stats_dtype and dgamma.shape == cshape
    # dx is a difference of terms of size |γ·s·dy|: errors are relative to that scale.
    scale = np.abs(g / np.sqrt(var + EPS)) * (np.abs(dy64) + 1)
    u = {np.dtype(np.float64): 2e-15, np.dtype(np.float32): 2e-6,
         np.dtype(np.float16): 2e-3, BF16: 1.6e-2}[np.dtype(dtype)]
    assert np.all(np.abs(dx.astype(np.float64) - dx_ref) <= 4 * u * scale)
    n = x.size // int(np.prod(cshape))
    tol = 1e-6 if x.dtype == np.float64 else 2e-6
    sum_scale = np.sqrt(n) * np.abs(dy64).max() * 4 + 1
    np.testing.assert_allclose(dgamma.ravel(), dg_ref.ravel(), atol=tol * sum_scale * n**0.5)
    np.testing.assert_allclose(dbeta.ravel(), db_ref.ravel(), atol=tol * sum_scale * n**0.5)
    return dx


LAYOUTS = [
    ((8, 5, 6, 64), (3,)),     # NHWC
    ((8, 64, 5, 6), (1,)),     # NCHW
    ((300, 3), (1,)),          # 2-D, folded short rows
    ((257, 1), (1,)),          # C = 1
    ((33, 17), (1,)),          # odd C
    ((4, 255), (1,)),          # odd C, few rows
    ((4, 7, 9, 17), (1, 3)),   # axis list
    ((6, 130, 70), (2,)),      # large enough for the parallel schedule
    ((3, 40000), (1,)),        # few rows: lines cut into segments
    ((2, 3), (1,)),            # tiny
]


@pytest.mark.parametrize("shape,axes", LAYOUTS)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_layouts_against_closed_form(shape, axes, masked, training):
    """R15: dx through the (masked) batch statistics, or with them fixed."""
    rng = np.random.default_rng(hash((shape, masked, training)) % 2**32)
    x, dy, gamma, mask = make_case(rng, shape, axes, np.float32, masked)
    check_against_closed_form(x, dy, gamma, axes, mask, training, np.float32)


# Rows of a few channels fold into one run that repeats the channels; unmasked, the
# backward walks it as super rows in register tiles, each thread's part ending in a
# rest shorter than a super row (40001 rows).
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("channels", [3, 5, 16])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, BF16])
@pytest.mark.parametrize("training", [True, False])
def test_folded_rows_against_closed_form(threads, channels, dtype, training):
    """R15 on channels-last rows of few channels."""
    rng = np.random.default_rng(channels)
    x, dy, gamma, _ = make_case(rng, (40001, channels), (1,), dtype, masked=False)
    cbn.set_num_threads(threads)
    try:
        check_against_closed_form(x, dy, gamma, (1,), None, training, dtype)
    finally:
        cbn.set_num_threads(0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, BF16])
@pytest.mark.parametrize("shape,axes", [((8, 5, 6, 64), (3,)), ((8, 64, 5, 6), (1,))])
def test_dtypes(dtype, shape, axes):
    rng = np.random.default_rng(7)
    x, dy, gamma, mask = make_case(rng, shape, axes, dtype, masked=True)
    check_against_closed_form(x, dy, gamma, axes, mask, True, dtype)


def test_strided_and_reversed_views():
    rng = np.random.default_rng(3)
    base_x = rng.normal(1.0, 3.0, (10, 9, 12, 40)).astype(np.float32)
    base_dy = rng.normal(0.0, 1.0, (12, 9, 10, 40)).astype(np.float32)
    x = base_x[::-1, :, ::2, 3:35]                      # reversed and strided
    dy = base_dy.transpose(2, 1, 0, 3)[:, :, ::2, 3:35]  # a different layout than x
    gamma = rng.normal(1.0, 0.2, (32,))
    check_against_closed_form(x, dy, gamma, (3,), None, True, np.float32)


def at_page_offset(values, offset):
    """A copy of ``values`` starting ``offset`` bytes into a page."""
    raw = np.empty(values.nbytes + 8192, np.uint8)
    start = (-raw.ctypes.data) % 4096 + offset
    out = raw[start:start + values.nbytes].view(values.dtype).reshape(values.shape)
    out[...] = values
    return out


@pytest.mark.parametrize("dtype, channels", [(np.float32, 1024), (np.float32, 512),
                                             (np.float64, 512), (np.float32, 256)])
def test_buffers_at_one_page_offset(dtype, channels):
    # x, dy and dx 16 bytes into their pages (as malloc places large buffers) with rows of
    # 1-4 KiB: the rows of a tile walk share L1 sets, so dx is written a row at a time
    # where they would overfill one. The values are the closed form's, and the same bits
    # as with the buffers apart.
    rng = np.random.default_rng(11)
    shape = (64, channels)
    x = rng.normal(2.0, 3.0, shape).astype(dtype)
    dy = rng.normal(0.0, 1.0, shape).astype(dtype)
    gamma = rng.normal(1.0, 0.2, (channels,))
    results = []
    for offsets in [(16, 16, 16), (16, 1040, 2064)]:
        xs, dys = at_page_offset(x, offsets[0]), at_page_offset(dy, offsets[1])
        out = at_page_offset(np.zeros_like(x), offsets[2])
        results.append(check_against_closed_form(xs, dys, gamma, (1,), None, True, dtype, out=out))
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("target", ["dy", "x"])
def test_in_place(target):
    rng = np.random.default_rng(5)
    x, dy, gamma, mask = make_case(rng, (16, 6, 6, 24), (3,), np.float32, masked=True)
    expected = check_against_closed_form(x, dy.copy(), gamma, (3,), mask, True, np.float32)
    x_in, dy_in = x.copy(), dy.copy()
    out = dy_in if target == "dy" else x_in
    cshape = (24,)
    x64 = x.astype(np.float64)
    red = (0, 1, 2)
    w = np.broadcast_to(mask[..., None], x.shape)
    mean = (w * x64).sum(red) / w.sum(red)
    var = (w * (x64 - mean) ** 2).sum(red) / w.sum(red)
    dx, _, _ = cbn.ops.batch_norm_backward(dy_in, x_in, mean.reshape(cshape), var, gamma=gamma,
                                           axis=3, mask=mask, out=out)
    assert dx is out
    np.testing.assert_allclose(dx, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_finite_differences_float64():
    """dx of L = Σ r·y, the forward in float64 NumPy, with a mask and an axis list."""
    rng = np.random.default_rng(11)
    shape, axes = (5, 4, 3, 6), (1, 3)
    x = rng.normal(2.0, 1.5, shape)
    r = rng.normal(0.0, 1.0, shape)
    gamma = channel_view(rng.normal(1.0, 0.3, (4, 6)), shape, axes)
    beta = channel_view(rng.normal(0.0, 0.3, (4, 6)), shape, axes)
    mask = rng.random(shape[:-1]) > 0.35
    mask[0, 0, 0] = mask[1, 0, 0] = True
    m = mask[..., None]

    def loss(xv):
        return float((r * forward64(xv, gamma, beta, axes, m, EPS)).sum())

    fd = numeric_grad(loss, x)
    h = 1e-6
    _, _, _, mean, var = backward64(r, x, gamma, axes, m, EPS, True)
    dx, dgamma, dbeta = cbn.ops.batch_norm_backward(
        r, x, mean.reshape(4, 6), var.reshape(4, 6), gamma=gamma.reshape(4, 6), axis=[1, 3],
        mask=mask, epsilon=EPS)
    np.testing.assert_allclose(dx, fd, rtol=1e-6, atol=1e-7)
    # dγ, dβ by finite differences in the weights.
    g0 = gamma.reshape(4, 6)
    for c in [(0, 0), (3, 5), (2, 1)]:
        gp, gm = g0.copy(), g0.copy()
        gp[c] += h
        gm[c] -= h
        lp = float((r * forward64(x, channel_view(gp, shape, axes), beta, axes, m, EPS)).sum())
        lm = float((r * forward64(x, channel_view(gm, shape, axes), beta, axes, m, EPS)).sum())
        assert dgamma[c] == pytest.approx((lp - lm) / (2 * h), rel=1e-6, abs=1e-7)
        assert dbeta[c] == pytest.approx(r[:, c[0], :, c[1]].sum(), rel=1e-12)


def test_inference_mode_finite_differences():
    """training=False: the statistics are constants (an inference call)."""
    rng = np.random.default_rng(12)
    x = rng.normal(0.0, 1.0, (7, 5))
    r = rng.normal(0.0, 1.0, (7, 5))
    mean, var = rng.normal(0, 1, 5), rng.uniform(0.5, 2.0, 5)
    gamma = rng.normal(1, 0.2, 5)
    dx, dgamma, dbeta = cbn.ops.batch_norm_backward(r, x, mean, var, gamma=gamma,
                                                    training=False)
    np.testing.assert_allclose(dx, r * gamma / np.sqrt(var + EPS), rtol=1e-14)
    np.testing.assert_allclose(dgamma, (r * (x - mean) / np.sqrt(var + EPS)).sum(0), rtol=1e-12)
    np.testing.assert_allclose(dbeta, r.sum(0), rtol=1e-12)


def test_constant_channel_stays_finite():
    x = np.random.default_rng(1).normal(0, 1, (64, 8)).astype(np.float32)
    x[:, 2] = 5.0
    dy = np.random.default_rng(2).normal(0, 1, x.shape).astype(np.float32)
    mean, var = cbn.ops.moments(x)
    dx, dgamma, dbeta = cbn.ops.batch_norm_backward(dy, x, mean, var)
    assert np.isfinite(dx).all() and np.isfinite(dgamma).all()
    # x̂ = 0 on the constant channel: dx = s·(dy − mean(dy)), s = 1/√eps.
    expected = (dy[:, 2] - dy[:, 2].astype(np.float64).mean()) / np.sqrt(EPS)
    np.testing.assert_allclose(dx[:, 2], expected, rtol=1e-5, atol=1e-4)


def test_fully_masked_channel_has_no_statistics_term():
    """A channel with no used position: statistics (0, 0) and dx = γ·dy/√eps."""
    x = np.arange(24, dtype=np.float64).reshape(4, 3, 2)
    dy = np.ones_like(x)
    mask = np.ones((4, 3, 2), bool)
    mask[..., 1] = False
    mean = np.array([x[..., 0].mean(), 0.0])
    var = np.array([x[..., 0].var(), 0.0])
    dx, _, _ = cbn.ops.batch_norm_backward(dy, x, mean, var, mask=mask)
    np.testing.assert_allclose(dx[..., 1], 1 / np.sqrt(EPS))
    np.testing.assert_allclose(dx[..., 0], 0.0, atol=1e-12)  # Σdy term cancels a constant dy


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("training", [True, False])
def test_against_torch_autograd(layout, training):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(21)
    nchw = rng.normal(1.0, 2.0, (6, 5, 7, 4))
    dy_nchw = rng.normal(0.0, 1.0, nchw.shape)
    gamma, beta = rng.normal(1.0, 0.3, 5), rng.normal(0.0, 0.3, 5)
    run_mean, run_var = rng.normal(0, 1, 5), rng.uniform(0.5, 2.0, 5)
    xt = torch.tensor(nchw, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    y = torch.nn.functional.batch_norm(
        xt, torch.tensor(run_mean), torch.tensor(run_var), gt, bt, training=training,
        momentum=0.0, eps=EPS)
    y.backward(torch.tensor(dy_nchw))
    if layout == "NCHW":
        x, dy, axis = nchw, dy_nchw, 1
    else:
        x, dy, axis = nchw.transpose(0, 2, 3, 1), dy_nchw.transpose(0, 2, 3, 1), 3
    if training:
        mean, var = nchw.mean((0, 2, 3)), nchw.var((0, 2, 3))
    else:
        mean, var = run_mean, run_var
    dx, dgamma, dbeta = cbn.ops.batch_norm_backward(dy, x, mean, var, gamma=gamma, axis=axis,
                                                    epsilon=EPS, training=training)
    dx_nchw = dx if layout == "NCHW" else dx.transpose(0, 3, 1, 2)
    np.testing.assert_allclose(dx_nchw, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, gt.grad.numpy(), rtol=1e-10)
    np.testing.assert_allclose(dbeta, bt.grad.numpy(), rtol=1e-10)


def test_thread_count_changes_rounding_only():
    rng = np.random.default_rng(4)
    x, dy, gamma, mask = make_case(rng, (64, 30, 30, 16), (3,), np.float32, masked=True)
    mean, var = cbn.ops.moments(x, mask=mask)
    before = cbn.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            cbn.set_num_threads(n)
            results.append(cbn.ops.batch_norm_backward(dy, x, mean, var, gamma=gamma, mask=mask))
    finally:
        cbn.set_num_threads(before)
    for a, b in zip(results[0], results[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(a).max()))


def test_errors():
    x = np.zeros((4, 3), np.float32)
    mean, var = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="dy has shape"):
        cbn.ops.batch_norm_backward(np.zeros((4, 2)), x, mean, var)
    with pytest.raises(TypeError, match="mean and variance are required"):
        cbn.ops.batch_norm_backward(x, x, None, var)
    with pytest.raises(ValueError, match="variance has shape"):
        cbn.ops.batch_norm_backward(x, x, mean, np.ones(4))
    with pytest.raises(ValueError, match="epsilon"):
        cbn.ops.batch_norm_backward(x, x, mean, var, epsilon=-1.0)
    with pytest.raises(ValueError, match="mask has shape"):
        cbn.ops.batch_norm_backward(x, x, mean, var, mask=np.ones((3,), bool))
    with pytest.raises(TypeError, match="out has dtype"):
        cbn.ops.batch_norm_backward(x, x, mean, var, out=np.zeros((4, 3)))
    big = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match="overlaps"):
        cbn.ops.batch_norm_backward(big[:4], big[:4].copy(), mean, var, out=big[1:])
    with pytest.raises(TypeError, match="dy has dtype"):
        cbn.ops.batch_norm_backward(np.zeros((4, 3), complex), x, mean, var)
