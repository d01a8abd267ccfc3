# cython: language_level=3, boundscheck=False, wraparound=False, embedsignature=True
"""Thin binding of the bn_core C API on NumPy arrays.

Callers (``cbn.ops``, the layer) validate shapes and convert inputs; this module
only describes arrays to the core, releases the GIL around it and turns status
codes into exceptions. Per-channel parameters and statistics are float64.
"""

from libc.stdint cimport int32_t, int64_t
from libc.string cimport memcpy

cimport numpy as cnp
import sys

import numpy as np

cnp.import_array()

# The C declarations (bn_core.h) are in _core.pxd, which Cython reads for this module.

#: The core's limits, from bn_core.h: the largest rank, and the element count below
#: which a call runs on the calling thread.
MAX_RANK = BN_MAX_RANK
SERIAL_THRESHOLD = BN_SERIAL_THRESHOLD

_DTYPE_CODES = {
    np.dtype(np.float32): BN_FLOAT32,
    np.dtype(np.float64): BN_FLOAT64,
    np.dtype(np.float16): BN_FLOAT16,
    np.dtype(np.bool_): BN_UINT8,
    np.dtype(np.uint8): BN_UINT8,
}


def is_bfloat16(dtype: np.dtype) -> bool:
    """Whether ``dtype`` is ml_dtypes' bfloat16. ml_dtypes is not imported for this
    (importing it takes longer than the rest of ``import cbn``): no array of its
    bfloat16 exists before it is."""
    module = sys.modules.get("ml_dtypes")
    return module is not None and dtype == module.bfloat16


# An array described to the core; shape and strides copied as int64.
cdef struct tensor_desc:
    bn_tensor t
    int64_t shape[BN_MAX_RANK]
    int64_t strides[BN_MAX_RANK]


cdef int describe(tensor_desc *d, cnp.ndarray a, bint is_mask) except -1:
    # The common dtypes by number, the others through the table; bfloat16 is a
    # user dtype that ml_dtypes registers.
    cdef int type_num = cnp.PyArray_TYPE(a)
    if type_num == cnp.NPY_FLOAT32:
        code = BN_FLOAT32
    elif type_num == cnp.NPY_FLOAT64:
        code = BN_FLOAT64
    else:
        code = _DTYPE_CODES.get(a.dtype)
        if code is None and is_bfloat16(a.dtype):
            code = BN_BFLOAT16
    if code is None or (code == BN_UINT8) != is_mask:
        raise TypeError(f"unsupported dtype {a.dtype} for {'a mask' if is_mask else 'data'}")
    cdef int rank = cnp.PyArray_NDIM(a)
    if rank > BN_MAX_RANK:
        raise ValueError(f"rank {rank} exceeds the maximum {BN_MAX_RANK}")
    cdef cnp.npy_intp *dims = cnp.PyArray_DIMS(a)
    cdef cnp.npy_intp *strides = cnp.PyArray_STRIDES(a)
    for i in range(rank):
        d.shape[i] = dims[i]
        d.strides[i] = strides[i]
    d.t.data = cnp.PyArray_DATA(a)
    d.t.dtype = code
    d.t.rank = rank
    d.t.shape = d.shape
    d.t.strides = d.strides
    return 0


cdef int check(bn_status status) except -1:
    if status == BN_OK:
        return 0
    message = bn_last_error().decode()
    if status == BN_ERR_DTYPE:
        raise TypeError(message)
    if status == BN_ERR_ALLOC:
        raise MemoryError(message)
    raise ValueError(message)


cdef class _Axes:
    cdef int32_t values[BN_MAX_RANK]
    cdef int32_t count

    def __cinit__(self, axes):
        if len(axes) > BN_MAX_RANK:
            raise ValueError(f"too many axes: {len(axes)}")
        self.count = len(axes)
        for i, a in enumerate(axes):
            self.values[i] = a


cdef Py_ssize_t channel_count(cnp.ndarray x, axes) except -1:
    cdef Py_ssize_t c = 1
    for a in axes:
        c *= x.shape[a]
    return c


cdef const double *param_ptr(object p, Py_ssize_t channels, str name) except? NULL:
    if p is None:
        return NULL
    cdef cnp.ndarray a = p
    if a.dtype != np.float64 or a.ndim != 1 or a.shape[0] != channels or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a contiguous float64 array of {channels} values")
    return <const double *>cnp.PyArray_DATA(a)


cdef struct bn_params:
    const double *mean
    const double *variance
    const double *gamma
    const double *beta


cdef int read_bn_params(bn_params *p, Py_ssize_t channels, mean, variance, gamma,
                        beta) except -1:
    """The statistics (required) and the optional gamma and beta of a normalization."""
    p.mean = param_ptr(mean, channels, "mean")
    p.variance = param_ptr(variance, channels, "variance")
    p.gamma = param_ptr(gamma, channels, "gamma")
    p.beta = param_ptr(beta, channels, "beta")
    if p.mean == NULL or p.variance == NULL:
        raise ValueError("mean and variance are required")
    return 0


cdef int check_output(cnp.ndarray y) except -1:
    if not y.flags.writeable:
        raise ValueError("the output array is read-only")
    return 0


def moments(cnp.ndarray x, tuple axes, mask):
    """Per-channel (mean, biased variance, count) as float64 arrays."""
    cdef tensor_desc xd, md
    cdef _Axes ax = _Axes(axes)
    describe(&xd, x, False)
    cdef bn_tensor *mp = NULL
    if mask is not None:
        describe(&md, mask, True)
        mp = &md.t
    cdef Py_ssize_t c = channel_count(x, axes)
    cdef cnp.ndarray mean = np.empty(c), var = np.empty(c), count = np.empty(c)
    cdef double *mean_p = <double *>cnp.PyArray_DATA(mean)
    cdef double *var_p = <double *>cnp.PyArray_DATA(var)
    cdef double *count_p = <double *>cnp.PyArray_DATA(count)
    cdef bn_status st
    with nogil:
        st = bn_moments(&xd.t, ax.values, ax.count, mp, mean_p, var_p, count_p)
    check(st)
    return mean, var, count


cdef const bn_tensor *optional_tensor(tensor_desc *d, object a) except? NULL:
    if a is None:
        return NULL
    describe(d, a, False)
    return &d.t


#: Activation names and the core's codes (its bn_activation enum); cbn._epilogue's table.
ACTIVATIONS = {
    "identity": BN_ACT_IDENTITY, "linear": BN_ACT_IDENTITY, "relu": BN_ACT_RELU,
    "relu6": BN_ACT_RELU6, "leaky_relu": BN_ACT_LEAKY_RELU, "clip": BN_ACT_CLIP,
    "silu": BN_ACT_SILU, "gelu": BN_ACT_GELU_TANH, "gelu_tanh": BN_ACT_GELU_TANH,
}


# A fused epilogue described to the core: the tuple (activation code, alpha, lo,
# hi, residual array or None) cbn._epilogue builds, or None for none.
cdef struct epilogue_desc:
    bn_epilogue e
    tensor_desc residual


cdef const bn_epilogue *set_epilogue(epilogue_desc *d, int32_t code, double alpha, double lo,
                                     double hi, object residual) except NULL:
    # The core checks the code's range (an int, as C passes it).
    memcpy(&d.e.activation, &code, sizeof(int32_t))
    d.e.alpha, d.e.lo, d.e.hi = alpha, lo, hi
    d.e.residual = optional_tensor(&d.residual, residual)
    return &d.e


cdef const bn_epilogue *describe_epilogue(epilogue_desc *d, object epilogue) except? NULL:
    if epilogue is None:
        return NULL
    activation, alpha, lo, hi, residual = epilogue
    return set_epilogue(d, activation, alpha, lo, hi, residual)


def normalize(cnp.ndarray x, cnp.ndarray y, tuple axes, mean, variance, gamma, beta,
              double epsilon, epilogue=None):
    """y = act((x - mean) * gamma / sqrt(variance + epsilon) + beta + residual) with
    the epilogue (none: y is the normalized value); y may be x."""
    cdef tensor_desc xd, yd
    cdef _Axes ax = _Axes(axes)
    describe(&xd, x, False)
    describe(&yd, y, False)
    check_output(y)
    cdef bn_params bp
    read_bn_params(&bp, channel_count(x, axes), mean, variance, gamma, beta)
    cdef epilogue_desc ed
    cdef const bn_epilogue *ep = describe_epilogue(&ed, epilogue)
    cdef bn_status st
    with nogil:
        st = bn_normalize_epilogue(&xd.t, &yd.t, ax.values, ax.count, bp.mean, bp.variance,
                                   bp.gamma, bp.beta, epsilon, ep)
    check(st)


def fold(cnp.ndarray weight, cnp.ndarray out, int axis, bias, mean, variance, gamma, beta,
         double epsilon):
    """out = weight scaled per output channel (along axis); returns the new bias (float64)."""
    cdef tensor_desc wd, od
    describe(&wd, weight, False)
    describe(&od, out, False)
    check_output(out)
    if not 0 <= axis < weight.ndim:
        raise ValueError(f"axis {axis} is out of range for a weight of rank {weight.ndim}")
    cdef Py_ssize_t c = weight.shape[axis]
    cdef const double *bias_p = param_ptr(bias, c, "bias")
    cdef bn_params bp
    read_bn_params(&bp, c, mean, variance, gamma, beta)
    cdef cnp.ndarray new_bias = np.empty(c)
    cdef double *new_bias_p = <double *>cnp.PyArray_DATA(new_bias)
    cdef bn_status st
    cdef int32_t out_axis = axis
    with nogil:
        st = bn_fold(&wd.t, &od.t, out_axis, bias_p, bp.mean, bp.variance, bp.gamma, bp.beta,
                     epsilon, new_bias_p)
    check(st)
    return new_bias


def train_forward(cnp.ndarray x, cnp.ndarray y, tuple axes, mask, gamma, beta, double epsilon,
                  epilogue=None):
    """Batch moments (masked) and normalization with them (and the epilogue) in one
    call; returns (mean, variance) as float64."""
    cdef tensor_desc xd, yd, md
    cdef _Axes ax = _Axes(axes)
    describe(&xd, x, False)
    describe(&yd, y, False)
    check_output(y)
    cdef bn_tensor *mp = NULL
    if mask is not None:
        describe(&md, mask, True)
        mp = &md.t
    cdef Py_ssize_t c = channel_count(x, axes)
    cdef const double *gamma_p = param_ptr(gamma, c, "gamma")
    cdef const double *beta_p = param_ptr(beta, c, "beta")
    cdef cnp.ndarray mean = np.empty(c), var = np.empty(c)
    cdef double *mean_p = <double *>cnp.PyArray_DATA(mean)
    cdef double *var_p = <double *>cnp.PyArray_DATA(var)
    cdef epilogue_desc ed
    cdef const bn_epilogue *ep = describe_epilogue(&ed, epilogue)
    cdef bn_status st
    with nogil:
        st = bn_train_forward_epilogue(&xd.t, &yd.t, ax.values, ax.count, mp, gamma_p, beta_p,
                                       epsilon, mean_p, var_p, ep)
    check(st)
    return mean, var


cdef bn_tensor *optional_mask(tensor_desc *d, mask) except? NULL:
    if mask is None:
        return NULL
    describe(d, mask, True)
    return &d.t


cdef double *out_ptr(cnp.ndarray a):
    return <double *>cnp.PyArray_DATA(a)


# The operands of a backward call described to the core: dy, x, the output dx
# (absent: None), the optional mask, and the per-channel mean, variance and gamma
# (absent: None, passed as NULL), checked in that order.
cdef struct grad_operands:
    tensor_desc dy, x, dx, mask
    bn_tensor *mask_p
    Py_ssize_t channels
    const double *mean
    const double *variance
    const double *gamma


cdef int describe_grad(grad_operands *g, cnp.ndarray dy, cnp.ndarray x, object dx, tuple axes,
                       mask, mean, variance, gamma) except -1:
    describe(&g.dy, dy, False)
    describe(&g.x, x, False)
    if dx is not None:
        describe(&g.dx, dx, False)
        check_output(dx)
    g.mask_p = optional_mask(&g.mask, mask)
    g.channels = channel_count(x, axes)
    g.mean = param_ptr(mean, g.channels, "mean")
    g.variance = param_ptr(variance, g.channels, "variance")
    g.gamma = param_ptr(gamma, g.channels, "gamma")
    return 0


def backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, tuple axes, mask, mean, variance,
             gamma, double epsilon, bint training):
    """dx (written into dx, which may be dy) and per-channel (Σdy, Σdy·x̂) as float64."""
    cdef grad_operands g
    cdef _Axes ax = _Axes(axes)
    describe_grad(&g, dy, x, dx, axes, mask, mean, variance, gamma)
    cdef cnp.ndarray sum_dy = np.empty(g.channels), sum_dy_xhat = np.empty(g.channels)
    cdef double *s1 = out_ptr(sum_dy)
    cdef double *s2 = out_ptr(sum_dy_xhat)
    cdef bn_status st
    with nogil:
        st = bn_backward(&g.dy.t, &g.x.t, &g.dx.t, ax.values, ax.count, g.mask_p, g.mean,
                         g.variance, g.gamma, epsilon, training, s1, s2)
    check(st)
    return sum_dy, sum_dy_xhat


# The operands of a backward through an epilogue: those of grad_operands, then beta
# (absent: NULL), the epilogue and the forward's output (absent: NULL).
cdef struct epilogue_grad_operands:
    grad_operands g
    const double *beta
    epilogue_desc epilogue
    const bn_epilogue *ep
    tensor_desc output
    const bn_tensor *output_p


cdef int describe_epilogue_grad(epilogue_grad_operands *o, cnp.ndarray dy, cnp.ndarray x,
                                object dx, tuple axes, mask, mean, variance, gamma, beta,
                                epilogue, output) except -1:
    describe_grad(&o.g, dy, x, dx, axes, mask, mean, variance, gamma)
    o.beta = param_ptr(beta, o.g.channels, "beta")
    o.ep = describe_epilogue(&o.epilogue, epilogue)
    o.output_p = optional_tensor(&o.output, output)
    return 0


def epilogue_gradient(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray g, tuple axes, mean,
                      variance, gamma, beta, double epsilon, epilogue, output):
    """g = dy * act'(z), z = bn(x) + residual, the gradient at the epilogue's input
    (g may be dy or output; output: the forward's y or None)."""
    cdef epilogue_grad_operands o
    cdef _Axes ax = _Axes(axes)
    describe_epilogue_grad(&o, dy, x, g, axes, None, mean, variance, gamma, beta, epilogue,
                           output)
    cdef bn_status st
    with nogil:
        st = bn_epilogue_gradient(&o.g.dy.t, &o.g.x.t, &o.g.dx.t, ax.values, ax.count, o.g.mean,
                                  o.g.variance, o.g.gamma, o.beta, epsilon, o.ep, o.output_p)
    check(st)


def backward_epilogue(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, tuple axes, mask, mean,
                      variance, gamma, beta, double epsilon, bint training, epilogue, output,
                      dresidual):
    """backward through the epilogue: dx, dresidual (an array or None) = g, and
    per-channel (Σg, Σg·x̂) as float64."""
    cdef epilogue_grad_operands o
    cdef _Axes ax = _Axes(axes)
    describe_epilogue_grad(&o, dy, x, dx, axes, mask, mean, variance, gamma, beta, epilogue,
                           output)
    if dresidual is not None:
        check_output(dresidual)
    cdef tensor_desc rd
    cdef const bn_tensor *rp = optional_tensor(&rd, dresidual)
    cdef cnp.ndarray sum_dy = np.empty(o.g.channels), sum_dy_xhat = np.empty(o.g.channels)
    cdef double *s1 = out_ptr(sum_dy)
    cdef double *s2 = out_ptr(sum_dy_xhat)
    cdef bn_status st
    with nogil:
        st = bn_backward_epilogue(&o.g.dy.t, &o.g.x.t, &o.g.dx.t, ax.values, ax.count,
                                  o.g.mask_p, o.g.mean, o.g.variance, o.g.gamma, o.beta, epsilon,
                                  training, s1, s2, o.ep, o.output_p, rp)
    check(st)
    return sum_dy, sum_dy_xhat


def moments_partial(cnp.ndarray x, tuple axes, mask, shift):
    """This rank's 3·C float64 buffer (counts, n·(mean − K), M2 + n·(mean − K)²)."""
    cdef tensor_desc xd, md
    cdef _Axes ax = _Axes(axes)
    describe(&xd, x, False)
    cdef bn_tensor *mp = optional_mask(&md, mask)
    cdef Py_ssize_t c = channel_count(x, axes)
    cdef const double *shift_p = param_ptr(shift, c, "shift")
    cdef cnp.ndarray partial = np.empty(3 * c)
    cdef double *out = out_ptr(partial)
    cdef bn_status st
    with nogil:
        st = bn_moments_partial(&xd.t, ax.values, ax.count, mp, shift_p, out)
    check(st)
    return partial


def moments_finalize(partial, shift):
    """(mean, variance) from a buffer of moments_partial summed over ranks."""
    cdef Py_ssize_t c = partial.shape[0] // 3
    cdef const double *partial_p = param_ptr(partial, 3 * c, "partial")
    cdef const double *shift_p = param_ptr(shift, c, "shift")
    cdef cnp.ndarray mean = np.empty(c), var = np.empty(c)
    check(bn_moments_finalize(c, partial_p, shift_p, out_ptr(mean), out_ptr(var)))
    return mean, var


def backward_sums(cnp.ndarray dy, cnp.ndarray x, tuple axes, mask, mean, variance,
                  double epsilon):
    """This rank's 3·C float64 buffer: used counts, Σdy, Σdy·x̂."""
    cdef grad_operands g
    cdef _Axes ax = _Axes(axes)
    describe_grad(&g, dy, x, None, axes, mask, mean, variance, None)
    cdef Py_ssize_t c = g.channels
    cdef cnp.ndarray sums = np.empty(3 * c)
    cdef double *out = out_ptr(sums)
    cdef bn_status st
    with nogil:
        st = bn_backward_sums(&g.dy.t, &g.x.t, ax.values, ax.count, g.mask_p, g.mean, g.variance,
                              epsilon, out, out + c, out + 2 * c)
    check(st)
    return sums


def backward_apply(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, tuple axes, mask, mean,
                   variance, gamma, double epsilon, sums):
    """dx through statistics whose backward_sums buffer (summed over ranks) is sums."""
    cdef grad_operands g
    cdef _Axes ax = _Axes(axes)
    describe_grad(&g, dy, x, dx, axes, mask, mean, variance, gamma)
    cdef Py_ssize_t c = g.channels
    cdef const double *sums_p = param_ptr(sums, 3 * c, "sums")
    cdef bn_status st
    with nogil:
        st = bn_backward_apply(&g.dy.t, &g.x.t, &g.dx.t, ax.values, ax.count, g.mask_p, g.mean,
                               g.variance, g.gamma, epsilon, sums_p, sums_p + c, sums_p + 2 * c)
    check(st)


def set_num_threads(int n):
    check(bn_set_num_threads(n))


# The small common call, without the general validation: _core_fast.pxi.
include "_core_fast.pxi"

# cbn.torch's running-statistics update: _core_running.pxi.
include "_core_running.pxi"


def set_cache_bytes(int64_t l2, int64_t l3):
    check(bn_set_cache_bytes(l2, l3))


def get_cache_bytes():
    """(per-core L2, shared L3) in bytes, as the training forward uses them."""
    cdef int64_t l2 = 0, l3 = 0
    bn_get_cache_bytes(&l2, &l3)
    return l2, l3


def cache_origin():
    """Where get_cache_bytes' sizes come from, in words."""
    return bn_cache_origin().decode()


def get_num_threads():
    return bn_get_num_threads()


def isa():
    """Name of the SIMD level in use."""
    return bn_isa_name(bn_get_isa()).decode()


def best_isa():
    """Name of the best SIMD level this CPU supports."""
    return bn_isa_name(bn_best_isa()).decode()


def set_isa(str name):
    """Select a SIMD level by name ('scalar', 'avx2', 'avx512'; '' for the best)."""
    encoded = name.encode()
    check(bn_set_isa_by_name(encoded))


def version():
    return bn_version().decode()


def build_info():
    return bn_build_info().decode()


# ---- the team of threads under contention

_TEAM_POLICIES = {"adaptive": BN_TEAM_ADAPTIVE, "full": BN_TEAM_FULL,
                  "caller_only": BN_TEAM_CALLER_ONLY}


def set_team_policy(str name):
    """'adaptive' (default), 'full' (always the whole team) or 'caller_only'."""
    if name not in _TEAM_POLICIES:
        raise ValueError(f"team policy must be one of {sorted(_TEAM_POLICIES)}; received {name!r}")
    check(bn_set_team_policy(_TEAM_POLICIES[name]))


def team_state():
    """The team policy, ms left on the caller alone, and the call counters."""
    cdef bn_team_state s
    bn_get_team_state(&s)
    names = {v: k for k, v in _TEAM_POLICIES.items()}
    return {"policy": names[s.policy], "caller_only_ms": s.caller_only_ms,
            "parallel_calls": s.parallel_calls, "late_calls": s.late_calls,
            "caller_only_calls": s.caller_only_calls}
