"""cbn.ops' fused epilogue, y = act(bn(x) + residual): the forward against a float64 NumPy
reference written here, the backward against its closed form, central finite differences
and PyTorch autograd (float64), synchronized calls, and bad arguments."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cbn
import ml_dtypes
import numpy as np
import pytest
from cbn import distributed, ops
from reference import bshape, mask_weights, numeric_grad

BF16 = np.dtype(ml_dtypes.bfloat16)
EPS = 1e-3
ALPHA = 0.1
CLIP = (-0.5, 1.25)
ACTIVATIONS = [None, "relu", "relu6", "leaky_relu", "clip", "silu", "gelu"]
#: Where each activation's derivative jumps: data of the backward tests stays away.
KINKS = {None: (), "relu": (0.0,), "relu6": (0.0, 6.0), "leaky_relu": (0.0,), "clip": CLIP,
         "silu": (), "gelu": ()}
#: Unit roundoff of the output: float32 arithmetic rounds 16-bit results once.
UNIT = {np.dtype(np.float64): 2.0**-53, np.dtype(np.float32): 2.0**-24,
        np.dtype(np.float16): 2.0**-11, BF16: 2.0**-8}
LAYOUTS = [
    pytest.param((4, 5, 6, 16), (3,), id="NHWC"),
    pytest.param((4, 16, 5, 6), (1,), id="NCHW"),
    pytest.param((500, 3), (1,), id="rows-of-3"),
    pytest.param((4, 7, 5, 6), (1, 3), id="axis-list"),
]
DTYPES = [np.float32, np.float64, np.float16, BF16]


def kwargs(name):
    """The epilogue arguments of activation ``name``."""
    extra = {"leaky_relu": {"activation_alpha": ALPHA}, "clip": {"clip": CLIP}}
    return {"activation": name, **extra.get(name, {})}


def act64(name, z):
    if name == "relu":
        return np.maximum(z, 0.0)
    if name == "relu6":
        return np.minimum(np.maximum(z, 0.0), 6.0)
    if name == "leaky_relu":
        return np.where(z >= 0, z, ALPHA * z)
    if name == "clip":
        return np.minimum(np.maximum(z, CLIP[0]), CLIP[1])
    if name == "silu":
        return z / (1.0 + np.exp(-z))
    if name == "gelu":
        return 0.5 * z * (1.0 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    return z


def dact64(name, z):
    """act'(z), PyTorch's values at the kinks."""
    if name == "relu":
        return (z > 0).astype(float)
    if name in ("relu6", "clip"):
        lo, hi = (0.0, 6.0) if name == "relu6" else CLIP
        return ((lo < z) & (z < hi)).astype(float)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, ALPHA)
    if name == "silu":
        s = 1.0 / (1.0 + np.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    if name == "gelu":
        k, c = np.sqrt(2 / np.pi), 0.044715
        t = np.tanh(k * (z + c * z**3))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k * (1.0 + 3 * c * z * z)
    return np.ones_like(z)


def f64(a):
    return None if a is None else np.asarray(a).astype(np.float64)


class Case:
    """Data of one call in ``dtype`` and its float64 reference values: the per-channel
    ``mean``/``var`` (the batch's in training, given ones otherwise), ``bn`` and ``z``."""

    def __init__(self, shape, axes, dtype, training, residual=True, masked=False, seed=0,
                 loc=3.0, scale=2.0):
        rng = np.random.default_rng(seed)
        self.axes, self.training = tuple(axes), training
        self.cshape = tuple(shape[a] for a in axes)
        self.x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
        self.gamma = rng.uniform(1.5, 4.0, self.cshape) * rng.choice([-1.0, 1.0], self.cshape)
        self.beta = rng.normal(0.5, 1.0, self.cshape)
        self.residual = rng.normal(0.0, 1.5, shape).astype(dtype) if residual else None
        self.mask = (rng.random(shape[:-1]) > 0.3) if masked else None
        if masked:
            self.mask.reshape(-1)[0] = True
        self.dy = rng.normal(0.0, 1.0, shape).astype(dtype)
        self.given = (loc + scale * rng.normal(0, 0.3, self.cshape),
                      scale**2 * rng.uniform(0.5, 2.0, self.cshape))
        self.update()

    def update(self):
        x = f64(self.x)
        red = tuple(i for i in range(x.ndim) if i not in self.axes)
        bs = bshape(x.shape, self.axes)
        if self.training:
            w = mask_weights(self.mask, x.shape)
            n = w.sum(red, keepdims=True)
            mean = (w * x).sum(red, keepdims=True) / n
            mean = mean + (w * (x - mean)).sum(red, keepdims=True) / n
            var = (w * (x - mean) ** 2).sum(red, keepdims=True) / n
        else:
            mean, var = (v.reshape(bs) for v in self.given)
        self.w = mask_weights(self.mask, x.shape)
        self.mean, self.var = mean.reshape(self.cshape), var.reshape(self.cshape)
        self.s = 1.0 / np.sqrt(var + EPS)
        self.xhat = (x - mean) * self.s
        self.bn = self.xhat * self.gamma.reshape(bs) + self.beta.reshape(bs)
        self.z = self.bn if self.residual is None else self.bn + f64(self.residual)

    def away_from_kinks(self, name, margin=1e-2):
        """Moves x where z is within ``margin`` (or a few roundings in x's dtype) of a kink;
        the statistics follow, so it repeats until none is."""
        u = UNIT[np.dtype(self.x.dtype)]
        for _ in range(20):
            self.update()
            near = [np.abs(self.z - k) < max(margin, 16 * u * abs(k)) for k in KINKS[name]]
            if not np.any(near):
                return self
            step = np.zeros_like(self.z)
            for k, n in zip(KINKS[name], near, strict=True):
                step += np.where(n, np.sign(self.z - k + 1e-300) * 3 * margin, 0.0)
            dx = step / (self.gamma.reshape(bshape(self.x.shape, self.axes)) * self.s)
            x = f64(self.x)
            self.x = (x + dx + np.sign(dx) * 8 * u * np.abs(x)).astype(self.x.dtype)
        raise AssertionError("could not move the data away from the kinks")

    def forward(self, name, out=None, residual=None, **extra):
        """cbn's forward with this case's data: (y, returned mean, variance or None). The
        axes go as a list, which takes the general path; ``extra`` overrides any argument."""
        common = {**dict(gamma=self.gamma, beta=self.beta, axis=list(self.axes), epsilon=EPS,
                         out=out, residual=self.residual if residual is None else residual),
                  **kwargs(name), **extra}
        if self.training:
            return ops.batch_norm_train(self.x, mask=self.mask, **common)
        return ops.batch_normalization(self.x, self.mean, self.var, **common), None, None

    def backward(self, name, **extra):
        return ops.batch_norm_backward(
            self.dy, self.x, self.mean, self.var, gamma=self.gamma, beta=self.beta,
            axis=list(self.axes), epsilon=EPS, mask=self.mask, training=self.training,
            residual=self.residual, **kwargs(name), **extra)

    def reference_backward(self, name):
        """(dx, dgamma, dbeta, g) in float64 by the closed form for g = dy·act'(z)."""
        red = tuple(i for i in range(self.x.ndim) if i not in self.axes)
        g = f64(self.dy) * dact64(name, self.z)
        sum_g = g.sum(red, keepdims=True)
        sum_g_xhat = (g * self.xhat).sum(red, keepdims=True)
        gamma = self.gamma.reshape(bshape(self.x.shape, self.axes))
        dx = g
        if self.training:
            n = np.maximum(self.w.sum(red, keepdims=True), 1.0)
            dx = g - self.w / n * (sum_g + self.xhat * sum_g_xhat)
        return gamma * self.s * dx, sum_g_xhat.reshape(self.cshape), sum_g.reshape(
            self.cshape), g


def assert_output_close(y, case, name):
    """y within a few roundings of act(z), relative to the size of its terms: 16 in the
    compute type (float32 or float64), 2 of the output's for 16-bit data (rounded once)."""
    u = UNIT[np.dtype(case.x.dtype)]
    terms = 1.0 + np.abs(case.bn) + np.abs(case.z - case.bn)
    factor = 2 if u > 2.0**-24 else 16
    err = np.abs(f64(y) - act64(name, case.z))
    assert np.all(err <= factor * u * terms), err.max()


def residual_of(kind, shape, dtype, seed):
    """A residual array: a contiguous one, or a reversed strided view of a larger one."""
    rng = np.random.default_rng(seed + 100)
    if kind == "strided":
        base = rng.normal(0.0, 1.5, (2 * shape[0], *shape[1:-1], shape[-1] + 3)).astype(dtype)
        return base[::2, ..., 3:][..., ::-1]
    return rng.normal(0.0, 1.5, shape).astype(dtype)


# ---------------------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axes", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("kind", ["none", "array", "strided", "output"])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_forward_against_float64(name, kind, training, shape, axes, dtype):
    seed = ACTIVATIONS.index(name)
    case = Case(shape, axes, dtype, training, residual=False, seed=seed)
    out = None
    if kind != "none":
        case.residual = residual_of(kind, shape, dtype, seed)
        case.update()
        out = case.residual.copy() if kind == "output" else None
        case.residual = out if kind == "output" else case.residual
    y, mean, var = case.forward(name, out=out)
    assert y.dtype == case.x.dtype and y.shape == case.x.shape
    assert out is None or y is out
    assert_output_close(y, case, name)
    if training:
        np.testing.assert_allclose(mean, case.mean, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(var, case.var, rtol=1e-5)


# Out-of-place outputs past the caches are written with streaming stores on aligned
# vectors; back-to-back rows on a misaligned output are walked with their channels (and
# the residual's) rotated. A tiny "L3" makes every output stream; offsets of one element
# and one byte into the output buffer misalign it.
@pytest.fixture
def streaming_outputs():
    cbn.set_cache_sizes(l2=1024, l3=2048)
    yield
    cbn.set_cache_sizes()


@pytest.mark.parametrize("offset", ["none", "element", "byte"])
@pytest.mark.parametrize("shape,axes", [((8, 12, 12, 64), (3,)), ((8, 12, 12, 17), (3,)),
                                        ((6, 40, 9, 9), (1,))])
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("name", ["relu", "silu"])
def test_streamed_outputs(streaming_outputs, name, training, shape, axes, offset):
    case = Case(shape, axes, np.float32, training, seed=7)
    size = case.x.dtype.itemsize
    buffer = np.full(case.x.nbytes + size, 0xA5, np.uint8)
    skip = {"none": 0, "element": size, "byte": 1}[offset]
    out = buffer[skip:skip + case.x.nbytes].view(np.float32).reshape(shape)
    y, _, _ = case.forward(name, out=out)
    assert y is out
    assert_output_close(y, case, name)
    assert np.all(np.r_[buffer[:skip], buffer[skip + case.x.nbytes:]] == 0xA5)


# Leaky slopes up to 1 and the other piecewise-linear activations share one branch-free
# walk (the larger of z and alpha·z, clamped); steeper slopes take the general one.
@pytest.mark.parametrize("alpha", [-0.5, 0.0, 0.1, 1.0, 2.5])
@pytest.mark.parametrize("shape,axes", LAYOUTS[:2])
@pytest.mark.parametrize("residual", [False, True])
def test_leaky_slopes(alpha, shape, axes, residual):
    case = Case(shape, axes, np.float32, False, residual=residual, seed=11)
    y = ops.batch_normalization(case.x, case.mean, case.var, beta=case.beta, gamma=case.gamma,
                                epsilon=EPS, axis=list(axes), activation="leaky_relu",
                                activation_alpha=alpha, residual=case.residual)
    want = np.where(case.z >= 0, case.z, alpha * case.z)
    terms = 1.0 + np.abs(case.bn) + np.abs(case.z - case.bn)
    assert np.all(np.abs(f64(y) - want) <= 16 * UNIT[np.dtype(np.float32)] * terms)


# NaN stays NaN and infinities are clamped or kept, as PyTorch's activations do:
# x = bn(x) with mean 0, variance 1 - eps, gamma 1, beta 0.
@pytest.mark.parametrize("name", ["relu", "relu6", "leaky_relu", "clip", None])
@pytest.mark.parametrize("shape,axes", LAYOUTS[:2])
def test_special_values(name, shape, axes):
    c = shape[axes[0]]
    x = np.zeros(shape, np.float32)
    values = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, -3.0, 7.0, 0.5], np.float32)
    x.reshape(-1)[:values.size * 5] = np.tile(values, 5)
    y = ops.batch_normalization(x, np.zeros(c), np.full(c, 1 - 2.0**-10), axis=list(axes),
                                epsilon=2.0**-10, **kwargs(name))
    lo, hi = {"relu": (0.0, np.inf), "relu6": (0.0, 6.0), "clip": CLIP}.get(
        name, (-np.inf, np.inf))
    slope = ALPHA if name == "leaky_relu" else 1.0
    want = np.clip(np.where(x < 0, x * np.float32(slope), x), lo, hi).astype(np.float32)
    np.testing.assert_array_equal(y, want)


@pytest.mark.parametrize("name", ACTIVATIONS)
@pytest.mark.parametrize("shape,axes", [LAYOUTS[0], LAYOUTS[3]])
def test_masked_training_forward(name, shape, axes):
    case = Case(shape, axes, np.float32, True, masked=True, seed=3)
    y, mean, var = case.forward(name)
    assert_output_close(y, case, name)
    np.testing.assert_allclose(var, case.var, rtol=1e-5)


@pytest.mark.parametrize("alias,name", [("gelu_tanh", "gelu"), ("linear", None),
                                        ("identity", None)])
def test_activation_aliases(alias, name):
    case = Case((30, 4), (1,), np.float64, True, seed=4)
    y, _, _ = case.forward(name)
    y_alias, _, _ = ops.batch_norm_train(case.x, gamma=case.gamma, beta=case.beta, epsilon=EPS,
                                         activation=alias, residual=case.residual)
    np.testing.assert_array_equal(y_alias, y)


@pytest.mark.parametrize("training", [True, False])
def test_in_place_on_x(training):
    case = Case((6, 5, 8), (2,), np.float32, training, seed=5)
    y, _, _ = case.forward("silu", out=case.x)
    assert y is case.x
    assert_output_close(y, case, "silu")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_large_mean_accuracy(name, training):
    """mean/std = 1e4 in float32: as accurate as without an epilogue (a few ulp of z)."""
    case = Case((4096, 8), (1,), np.float32, training, seed=6, loc=1e4 * 3.7, scale=3.7)
    case.gamma = np.linspace(0.5, 2.0, 8)
    case.update()
    y, _, var = case.forward(name)
    assert_output_close(y, case, name)
    if training:
        np.testing.assert_array_less(np.abs(f64(var) - case.var), 1e-6 * case.var)


# ---------------------------------------------------------------------------- backward


def assert_backward_close(got, case, name):
    dx_ref, dgamma_ref, dbeta_ref, g_ref = case.reference_backward(name)
    dx, dgamma, dbeta, *rest = got
    assert len(rest) == (case.residual is not None)
    assert dx.dtype == case.x.dtype and dgamma.shape == case.cshape
    u = {np.dtype(np.float64): 2e-15, np.dtype(np.float32): 2e-6, np.dtype(np.float16): 2e-3,
         BF16: 1.6e-2}[np.dtype(case.x.dtype)]
    gamma = case.gamma.reshape(bshape(case.x.shape, case.axes))
    dy = np.abs(f64(case.dy))
    assert np.all(np.abs(f64(dx) - dx_ref) <= 8 * u * np.abs(gamma * case.s) * (dy + 1))
    n = case.x.size // int(np.prod(case.cshape))
    atol = 8 * u * n * (np.abs(dy).max() + 1)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=0, atol=atol)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=0, atol=atol)
    if rest:
        assert rest[0].dtype == case.x.dtype
        assert np.all(np.abs(f64(rest[0]) - g_ref) <= 8 * u * (dy + 1))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("shape,axes", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_backward_against_closed_form(name, residual, training, shape, axes, dtype):
    case = Case(shape, axes, dtype, training, residual=residual, seed=7).away_from_kinks(name)
    got = case.backward(name)
    assert_backward_close(got, case, name)
    y, _, _ = case.forward(name)
    with_output = case.backward(name, output=y)
    for a, b in zip(got, with_output, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(a).max()))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape,axes", [
    pytest.param((40001, 3), (1,), id="folded-rows-of-3"),
    pytest.param((6, 130, 70), (2,), id="parallel-NHWC"),
    pytest.param((8, 24, 30, 30), (1,), id="parallel-NCHW"),
])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_large_tensors(name, shape, axes, threads, dtype):
    """Sizes that take the vector and parallel schedules, forward and backward."""
    before = cbn.get_num_threads()
    cbn.set_num_threads(threads)
    try:
        case = Case(shape, axes, dtype, True, seed=16).away_from_kinks(name)
        y, _, _ = case.forward(name)
        assert_output_close(y, case, name)
        assert_backward_close(case.backward(name, output=y), case, name)
        case.training = False
        case.away_from_kinks(name)
        assert_output_close(case.forward(name)[0], case, name)
        assert_backward_close(case.backward(name), case, name)
    finally:
        cbn.set_num_threads(before)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_masked_training_backward(name):
    case = Case((6, 5, 4, 12), (3,), np.float32, True, masked=True, seed=8)
    case.away_from_kinks(name)
    assert_backward_close(case.backward(name), case, name)


@pytest.mark.parametrize("target", ["dy", "x"])
def test_backward_in_place(target):
    case = Case((16, 6, 24), (2,), np.float32, True, seed=9).away_from_kinks("relu")
    expected = case.backward("relu")
    x, dy = case.x.copy(), case.dy.copy()
    out = case.dy if target == "dy" else case.x
    got = case.backward("relu", out=out)
    assert got[0] is out
    case.x, case.dy = x, dy
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * float(np.abs(b).max()))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_finite_differences(name, training):
    """dx, dgamma, dbeta and dresidual of L = Σ r·act(bn(x) + residual), float64, masked."""
    case = Case((5, 4, 3), (2,), np.float64, training, masked=training, seed=10)
    case.away_from_kinks(name, margin=0.05)
    r = case.dy

    def loss(x=case.x, gamma=case.gamma, beta=case.beta, residual=case.residual):
        probe = Case.__new__(Case)
        probe.__dict__.update(case.__dict__, x=x, gamma=gamma, beta=beta, residual=residual)
        probe.update()
        return float((r * act64(name, probe.z)).sum())

    dx, dgamma, dbeta, dresidual = case.backward(name)
    for got, arg in ((dx, "x"), (dgamma, "gamma"), (dbeta, "beta"), (dresidual, "residual")):
        fd = numeric_grad(lambda v, a=arg: loss(**{a: v}), getattr(case, arg))
        np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-7, err_msg=arg)


TORCH_ACTS = {
    None: lambda F, z: z, "relu": lambda F, z: F.relu(z), "relu6": lambda F, z: F.relu6(z),
    "leaky_relu": lambda F, z: F.leaky_relu(z, ALPHA),
    "clip": lambda F, z: F.hardtanh(z, *CLIP), "silu": lambda F, z: F.silu(z),
    "gelu": lambda F, z: F.gelu(z, approximate="tanh"),
}


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", ACTIVATIONS)
def test_against_torch_autograd(name, training):
    torch = pytest.importorskip("torch")
    case = Case((6, 5, 7, 4), (1,), np.float64, training, seed=11).away_from_kinks(name)
    t = {k: torch.tensor(getattr(case, k), requires_grad=True)
         for k in ("x", "gamma", "beta", "residual")}
    bn = torch.nn.functional.batch_norm(
        t["x"], torch.tensor(case.mean), torch.tensor(case.var), t["gamma"], t["beta"],
        training=training, momentum=0.0, eps=EPS)
    y_torch = TORCH_ACTS[name](torch.nn.functional, bn + t["residual"])
    y_torch.backward(torch.tensor(case.dy))
    y, _, _ = case.forward(name)
    np.testing.assert_allclose(y, y_torch.detach().numpy(), rtol=1e-12, atol=1e-12)
    for got, key in zip(case.backward(name), ("x", "gamma", "beta", "residual"), strict=True):
        np.testing.assert_allclose(got, t[key].grad.numpy(), rtol=1e-10, atol=1e-12,
                                   err_msg=key)


# ---------------------------------------------------------------------------- allreduce


def in_place_identity(buf):
    """A world of one rank, summing in place."""


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_allreduce_world_of_one(name):
    case = Case((8, 5, 6), (2,), np.float64, True, masked=True, seed=12).away_from_kinks(name)
    y, mean, var = case.forward(name)
    y_sync, mean_sync, var_sync = case.forward(name, allreduce=in_place_identity)
    np.testing.assert_allclose(y_sync, y, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(var_sync, var, rtol=1e-13)
    got = case.backward(name, allreduce=in_place_identity)
    assert_backward_close(got, case, name)
    got_with_output = case.backward(name, allreduce=in_place_identity, output=y)
    for a, b in zip(got, got_with_output, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["relu", "silu", "clip"])
def test_two_ranks_match_the_whole_batch(name):
    """Each rank's y, dx, dresidual slices as the whole batch's; dγ, dβ sum to its."""
    whole = Case((10, 4, 6), (2,), np.float32, True, seed=13).away_from_kinks(name)
    y_ref = act64(name, whole.z)
    dx_ref, dgamma_ref, dbeta_ref, g_ref = whole.reference_backward(name)
    group = distributed.ThreadGroup(2, timeout=30.0)
    parts = (slice(0, 7), slice(7, 10))

    def rank(r):
        sl = parts[r]
        y, mean, var = ops.batch_norm_train(
            whole.x[sl], gamma=whole.gamma, beta=whole.beta, epsilon=EPS, allreduce=group[r],
            residual=whole.residual[sl], **kwargs(name))
        grads = ops.batch_norm_backward(
            whole.dy[sl], whole.x[sl], mean, var, gamma=whole.gamma, beta=whole.beta,
            epsilon=EPS, allreduce=group[r], residual=whole.residual[sl], **kwargs(name))
        return y, grads

    with ThreadPoolExecutor(2) as pool:
        results = [f.result(timeout=60) for f in [pool.submit(rank, r) for r in (0, 1)]]
    scale = np.abs(whole.gamma * whole.s) * (np.abs(f64(whole.dy)) + 1)
    for sl, (y, (dx, _, _, dres)) in zip(parts, results, strict=True):
        np.testing.assert_allclose(y, y_ref[sl], rtol=1e-5, atol=1e-5)
        assert np.all(np.abs(f64(dx) - dx_ref[sl]) <= 1e-5 * scale[sl])
        np.testing.assert_allclose(dres, g_ref[sl], rtol=1e-6, atol=1e-6)
    dgamma = sum(f64(grads[1]) for _, grads in results)
    dbeta = sum(f64(grads[2]) for _, grads in results)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------- errors


BAD = [
    ({"activation": "swish"}, ValueError, r"activation='swish' is not .* expected None or "
     r"one of 'identity', 'linear', 'relu', 'relu6', 'leaky_relu', 'clip', 'silu', 'gelu'"),
    ({"activation": 1}, TypeError, "activation must be a str or None; received 1"),
    ({"activation": "clip"}, ValueError, r"activation='clip' needs clip=\(lo, hi\)"),
    ({"activation": "relu", "clip": (0, 1)}, ValueError, "activation is not 'clip'"),
    ({"clip": (0, 1)}, ValueError, "activation is not 'clip'"),
    ({"activation": "clip", "clip": (0, 1, 2)}, ValueError, r"clip must be a pair \(lo, hi\)"),
    ({"activation": "clip", "clip": 1.0}, ValueError, r"clip must be a pair"),
    ({"activation": "clip", "clip": (2.0, 1.0)}, ValueError, "needs lo <= hi"),
    ({"activation": "clip", "clip": (np.nan, 1.0)}, ValueError, "clip's lo must not be NaN"),
    ({"activation": "clip", "clip": (0.0, "1")}, TypeError, "clip's hi must be a real number"),
    ({"activation": "leaky_relu", "activation_alpha": np.nan}, ValueError,
     "activation_alpha must not be NaN"),
    ({"activation": "leaky_relu", "activation_alpha": np.inf}, ValueError,
     "activation_alpha must be finite"),
    ({"activation": "leaky_relu", "activation_alpha": None}, TypeError,
     "activation_alpha must be a real number"),
    ({"residual": np.zeros((4, 2))}, ValueError,
     r"residual has shape \(4, 2\); expected the input's shape \(4, 3\)"),
    ({"residual": np.zeros((4, 3), complex)}, TypeError, "residual has dtype complex128"),
    ({"activation": "relu", "residual": np.zeros(3)}, ValueError, "residual has shape"),
]


@pytest.mark.parametrize("op", ["batch_normalization", "batch_norm_train",
                                "batch_norm_backward"])
@pytest.mark.parametrize("args,error,match", BAD)
def test_bad_arguments_raise_and_write_nothing(op, args, error, match):
    x = np.random.default_rng(14).normal(0.0, 1.0, (4, 3)).astype(np.float32)
    out = np.full_like(x, 7.0)
    calls = {
        "batch_normalization": lambda: ops.batch_normalization(x, np.zeros(3), np.ones(3),
                                                               out=out, **args),
        "batch_norm_train": lambda: ops.batch_norm_train(x, out=out, **args),
        "batch_norm_backward": lambda: ops.batch_norm_backward(x, x, np.zeros(3), np.ones(3),
                                                               out=out, **args),
    }
    with pytest.raises(error, match=match):
        calls[op]()
    np.testing.assert_array_equal(out, 7.0)


def test_backward_output_is_checked():
    x = np.zeros((4, 3))
    with pytest.raises(ValueError, match=r"output has shape \(3,\); expected the input's"):
        ops.batch_norm_backward(x, x, np.zeros(3), np.ones(3), activation="relu",
                                output=np.zeros(3))


def test_residual_overlapping_the_output_raises():
    base = np.zeros((5, 3), np.float32)
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError):
        ops.batch_norm_train(x, residual=base[1:], out=base[:4])
    np.testing.assert_array_equal(base, 0.0)


def test_without_epilogue_arguments_nothing_changes():
    """No epilogue argument (or the identity without a residual): the plain results."""
    case = Case((12, 5), (1,), np.float32, True, residual=False, seed=15)
    plain = ops.batch_norm_train(case.x, gamma=case.gamma, beta=case.beta)
    identity = ops.batch_norm_train(case.x, gamma=case.gamma, beta=case.beta,
                                    activation="identity")
    for a, b in zip(plain, identity, strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(ops.batch_norm_backward(case.dy, case.x, plain[1], plain[2],
                                       activation="relu")) == 3


def test_readme_example_runs():
    """README.md's "Fused activation and residual" example runs as written."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("#### Fused activation and residual", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
