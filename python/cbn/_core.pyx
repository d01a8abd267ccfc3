# cython: language_level=3, boundscheck=False, wraparound=False, embedsignature=True
"""Thin binding of the bn_core C API on NumPy arrays.

Callers (``cbn.ops``, the layer) validate shapes and convert inputs; this module
only describes arrays to the core, releases the GIL around it and turns status
codes into exceptions. Per-channel parameters and statistics are float64.
"""

from libc.stdint cimport int32_t, int64_t
from libc.string cimport memcpy

cimport numpy as cnp
import ml_dtypes
import numpy as np

cnp.import_array()

cdef extern from "bn_core/bn_core.h" nogil:
    ctypedef enum bn_status:
        BN_OK
        BN_ERR_DTYPE
        BN_ERR_ALLOC
        BN_ERR_UNSUPPORTED
    ctypedef enum bn_dtype:
        BN_FLOAT32
        BN_FLOAT64
        BN_FLOAT16
        BN_BFLOAT16
        BN_UINT8
    ctypedef enum bn_isa:
        pass
    ctypedef struct bn_tensor:
        void *data
        bn_dtype dtype
        int32_t rank
        const int64_t *shape
        const int64_t *strides
    int BN_MAX_RANK
    bn_status bn_moments(const bn_tensor *x, const int32_t *axes, int32_t n_axes,
                         const bn_tensor *mask, double *mean, double *variance, double *count)
    bn_status bn_normalize(const bn_tensor *x, const bn_tensor *y, const int32_t *axes,
                           int32_t n_axes, const double *mean, const double *variance,
                           const double *gamma, const double *beta, double epsilon)
    bn_status bn_train_forward(const bn_tensor *x, const bn_tensor *y, const int32_t *axes,
                               int32_t n_axes, const bn_tensor *mask, const double *gamma,
                               const double *beta, double epsilon, double *mean, double *variance)
    bn_status bn_backward(const bn_tensor *dy, const bn_tensor *x, const bn_tensor *dx,
                          const int32_t *axes, int32_t n_axes, const bn_tensor *mask,
                          const double *mean, const double *variance, const double *gamma,
                          double epsilon, int32_t training, double *sum_dy, double *sum_dy_xhat)
    bn_status bn_moments_partial(const bn_tensor *x, const int32_t *axes, int32_t n_axes,
                                 const bn_tensor *mask, const double *shift, double *partial)
    bn_status bn_moments_finalize(int64_t channels, const double *partial, const double *shift,
                                  double *mean, double *variance)
    bn_status bn_backward_sums(const bn_tensor *dy, const bn_tensor *x, const int32_t *axes,
                               int32_t n_axes, const bn_tensor *mask, const double *mean,
                               const double *variance, double epsilon, double *count,
                               double *sum_dy, double *sum_dy_xhat)
    bn_status bn_backward_apply(const bn_tensor *dy, const bn_tensor *x, const bn_tensor *dx,
                                const int32_t *axes, int32_t n_axes, const bn_tensor *mask,
                                const double *mean, const double *variance, const double *gamma,
                                double epsilon, const double *count, const double *sum_dy,
                                const double *sum_dy_xhat)
    bn_status bn_set_num_threads(int32_t n)
    bn_status bn_set_cache_bytes(int64_t l2, int64_t l3)
    void bn_get_cache_bytes(int64_t *l2, int64_t *l3)
    int32_t bn_get_num_threads()
    bn_isa bn_get_isa()
    bn_isa bn_best_isa()
    bn_status bn_set_isa_by_name(const char *name)
    const char *bn_isa_name(bn_isa isa)
    const char *bn_last_error()
    const char *bn_version()
    const char *bn_build_info()

_DTYPE_CODES = {
    np.dtype(np.float32): BN_FLOAT32,
    np.dtype(np.float64): BN_FLOAT64,
    np.dtype(np.float16): BN_FLOAT16,
    np.dtype(ml_dtypes.bfloat16): BN_BFLOAT16,
    np.dtype(np.bool_): BN_UINT8,
    np.dtype(np.uint8): BN_UINT8,
}


# An array described to the core; shape and strides copied as int64.
cdef struct tensor_desc:
    bn_tensor t
    int64_t shape[64]
    int64_t strides[64]


cdef int describe(tensor_desc *d, cnp.ndarray a, bint is_mask) except -1:
    # The common dtypes by number; bfloat16 (a registered user dtype) through the table.
    cdef int type_num = cnp.PyArray_TYPE(a)
    if type_num == cnp.NPY_FLOAT32:
        code = BN_FLOAT32
    elif type_num == cnp.NPY_FLOAT64:
        code = BN_FLOAT64
    else:
        code = _DTYPE_CODES.get(a.dtype)
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
    cdef int32_t values[64]
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


def normalize(cnp.ndarray x, cnp.ndarray y, tuple axes, mean, variance, gamma, beta,
              double epsilon):
    """y = (x - mean) * gamma / sqrt(variance + epsilon) + beta; y may be x."""
    cdef tensor_desc xd, yd
    cdef _Axes ax = _Axes(axes)
    describe(&xd, x, False)
    describe(&yd, y, False)
    check_output(y)
    cdef Py_ssize_t c = channel_count(x, axes)
    cdef const double *mean_p = param_ptr(mean, c, "mean")
    cdef const double *var_p = param_ptr(variance, c, "variance")
    cdef const double *gamma_p = param_ptr(gamma, c, "gamma")
    cdef const double *beta_p = param_ptr(beta, c, "beta")
    if mean_p == NULL or var_p == NULL:
        raise ValueError("mean and variance are required")
    cdef bn_status st
    with nogil:
        st = bn_normalize(&xd.t, &yd.t, ax.values, ax.count, mean_p, var_p, gamma_p, beta_p,
                          epsilon)
    check(st)


def train_forward(cnp.ndarray x, cnp.ndarray y, tuple axes, mask, gamma, beta, double epsilon):
    """Batch moments (masked) and normalization with them in one call; returns
    (mean, variance) as float64."""
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
    cdef bn_status st
    with nogil:
        st = bn_train_forward(&xd.t, &yd.t, ax.values, ax.count, mp, gamma_p, beta_p, epsilon,
                              mean_p, var_p)
    check(st)
    return mean, var


cdef bn_tensor *optional_mask(tensor_desc *d, mask) except? NULL:
    if mask is None:
        return NULL
    describe(d, mask, True)
    return &d.t


cdef double *out_ptr(cnp.ndarray a):
    return <double *>cnp.PyArray_DATA(a)


cdef int describe_grad(tensor_desc *dyd, tensor_desc *xd, tensor_desc *dxd, cnp.ndarray dy,
                       cnp.ndarray x, object dx) except -1:
    """The backward operands: dy and x, and the output dx unless it is None."""
    describe(dyd, dy, False)
    describe(xd, x, False)
    if dx is not None:
        describe(dxd, dx, False)
        check_output(dx)
    return 0


def backward(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, tuple axes, mask, mean, variance,
             gamma, double epsilon, bint training):
    """dx (written into dx, which may be dy) and per-channel (Σdy, Σdy·x̂) as float64."""
    cdef tensor_desc dyd, xd, dxd, md
    cdef _Axes ax = _Axes(axes)
    describe_grad(&dyd, &xd, &dxd, dy, x, dx)
    cdef bn_tensor *mp = optional_mask(&md, mask)
    cdef Py_ssize_t c = channel_count(x, axes)
    cdef const double *mean_p = param_ptr(mean, c, "mean")
    cdef const double *var_p = param_ptr(variance, c, "variance")
    cdef const double *gamma_p = param_ptr(gamma, c, "gamma")
    cdef cnp.ndarray sum_dy = np.empty(c), sum_dy_xhat = np.empty(c)
    cdef double *s1 = out_ptr(sum_dy)
    cdef double *s2 = out_ptr(sum_dy_xhat)
    cdef bn_status st
    with nogil:
        st = bn_backward(&dyd.t, &xd.t, &dxd.t, ax.values, ax.count, mp, mean_p, var_p, gamma_p,
                         epsilon, training, s1, s2)
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
    cdef tensor_desc dyd, xd, md
    cdef _Axes ax = _Axes(axes)
    describe_grad(&dyd, &xd, NULL, dy, x, None)
    cdef bn_tensor *mp = optional_mask(&md, mask)
    cdef Py_ssize_t c = channel_count(x, axes)
    cdef const double *mean_p = param_ptr(mean, c, "mean")
    cdef const double *var_p = param_ptr(variance, c, "variance")
    cdef cnp.ndarray sums = np.empty(3 * c)
    cdef double *out = out_ptr(sums)
    cdef bn_status st
    with nogil:
        st = bn_backward_sums(&dyd.t, &xd.t, ax.values, ax.count, mp, mean_p, var_p, epsilon,
                              out, out + c, out + 2 * c)
    check(st)
    return sums


def backward_apply(cnp.ndarray dy, cnp.ndarray x, cnp.ndarray dx, tuple axes, mask, mean,
                   variance, gamma, double epsilon, sums):
    """dx through statistics whose backward_sums buffer (summed over ranks) is sums."""
    cdef tensor_desc dyd, xd, dxd, md
    cdef _Axes ax = _Axes(axes)
    describe_grad(&dyd, &xd, &dxd, dy, x, dx)
    cdef bn_tensor *mp = optional_mask(&md, mask)
    cdef Py_ssize_t c = channel_count(x, axes)
    cdef const double *mean_p = param_ptr(mean, c, "mean")
    cdef const double *var_p = param_ptr(variance, c, "variance")
    cdef const double *gamma_p = param_ptr(gamma, c, "gamma")
    cdef const double *sums_p = param_ptr(sums, 3 * c, "sums")
    cdef bn_status st
    with nogil:
        st = bn_backward_apply(&dyd.t, &xd.t, &dxd.t, ax.values, ax.count, mp, mean_p, var_p,
                               gamma_p, epsilon, sums_p, sums_p + c, sums_p + 2 * c)
    check(st)


def set_num_threads(int n):
    check(bn_set_num_threads(n))


# ---- the small common call, without the general validation ----------------------

cdef enum:
    FAST_MAX_CHANNELS = 64

cdef extern from "numpy/arrayobject.h":
    # A new array of a's shape and dtype with a's memory order (np.empty_like).
    object PyArray_NewLikeArray(cnp.ndarray a, cnp.NPY_ORDER order, void *descr, int subok)


cdef bint fast_param(object p, Py_ssize_t c, double *out, double default):
    """Copy a per-channel parameter into out as float64: None (default), or a 1-D
    float32/float64 ndarray of c values. False when p is anything else."""
    cdef cnp.ndarray a
    cdef Py_ssize_t i, stride
    cdef char *data
    if p is None:
        for i in range(c):
            out[i] = default
        return True
    if type(p) is not np.ndarray:
        return False
    a = <cnp.ndarray>p
    if cnp.PyArray_NDIM(a) != 1 or cnp.PyArray_DIMS(a)[0] != c:
        return False
    data = <char *>cnp.PyArray_DATA(a)
    stride = cnp.PyArray_STRIDES(a)[0]
    if cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT64:
        for i in range(c):
            out[i] = (<double *>(data + i * stride))[0]
    elif cnp.PyArray_TYPE(a) == cnp.NPY_FLOAT32:
        for i in range(c):
            out[i] = (<float *>(data + i * stride))[0]
    else:
        return False
    return True


cdef bint byte_extent(cnp.ndarray a, char **lo, char **hi):
    """[lo, hi) spans every byte of a's elements; False when a has none."""
    cdef char *first = <char *>cnp.PyArray_DATA(a)
    cdef char *last = first
    cdef int d
    cdef Py_ssize_t reach
    for d in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIMS(a)[d] == 0:
            return False
        reach = (cnp.PyArray_DIMS(a)[d] - 1) * cnp.PyArray_STRIDES(a)[d]
        if reach < 0:
            first += reach
        else:
            last += reach
    lo[0] = first
    hi[0] = last + cnp.PyArray_ITEMSIZE(a)
    return True


cdef bint fast_out(object out, cnp.ndarray a):
    """Whether out can take a's output on the fast path: a writeable ndarray of a's
    dtype and shape that is a's own view (in place) or shares no byte with it."""
    if type(out) is not np.ndarray:
        return False
    cdef cnp.ndarray o = <cnp.ndarray>out
    cdef int d, rank = cnp.PyArray_NDIM(a)
    if cnp.PyArray_TYPE(o) != cnp.PyArray_TYPE(a) or cnp.PyArray_NDIM(o) != rank \
            or not cnp.PyArray_ISWRITEABLE(o):
        return False
    cdef bint same_view = cnp.PyArray_DATA(o) == cnp.PyArray_DATA(a)
    for d in range(rank):
        if cnp.PyArray_DIMS(o)[d] != cnp.PyArray_DIMS(a)[d]:
            return False
        same_view = same_view and cnp.PyArray_STRIDES(o)[d] == cnp.PyArray_STRIDES(a)[d]
    if same_view:
        return True
    cdef char *a_lo
    cdef char *a_hi
    cdef char *o_lo
    cdef char *o_hi
    if not byte_extent(a, &a_lo, &a_hi) or not byte_extent(o, &o_lo, &o_hi):
        return True
    return o_hi <= a_lo or a_hi <= o_lo


cdef int fast_axis(object x, object axis, object epsilon, object out) except -2:
    """x's channel axis when (x, axis, epsilon, out) make a fast call — a float32 or
    float64 ndarray, an int axis, a float epsilon >= 0, no ``out`` or an ``out`` that
    is x's view or a separate buffer of its shape and dtype — else -1."""
    if type(x) is not np.ndarray or type(axis) is not int or type(epsilon) is not float:
        return -1
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef int type_num = cnp.PyArray_TYPE(a)
    cdef int rank = cnp.PyArray_NDIM(a)
    if (type_num != cnp.NPY_FLOAT32 and type_num != cnp.NPY_FLOAT64) or rank < 1 \
            or rank > BN_MAX_RANK:
        return -1
    cdef int ax = axis
    if ax < 0:
        ax += rank
    cdef double eps = epsilon
    if ax < 0 or ax >= rank or not (0.0 <= eps < float("inf")):
        return -1
    if out is not None and not fast_out(out, a):
        return -1
    return ax


cdef object heap_params(Py_ssize_t values):
    """None when values float64s fit the caller's stack buffer of 4 * FAST_MAX_CHANNELS
    (a heap array costs more than a tiny call), else a new array of them."""
    return None if values <= 4 * FAST_MAX_CHANNELS else np.empty(values)


cdef bn_status fast_core_call(bint train, const bn_tensor *x, const bn_tensor *y,
                              const int32_t *axes, double *params, Py_ssize_t c,
                              double eps) noexcept nogil:
    """The core call of a fast call; params holds 4 * c values: (mean, variance, gamma,
    beta) to normalize with, or (gamma, beta) then room for (mean, variance) to train."""
    if train:
        return bn_train_forward(x, y, axes, 1, NULL, params, params + c, eps, params + 2 * c,
                                params + 3 * c)
    return bn_normalize(x, y, axes, 1, params, params + c, params + 2 * c, params + 3 * c, eps)


cdef cnp.ndarray stats_array(const double *values, Py_ssize_t c, int type_num):
    """The c statistics as a new 1-D array of type_num (float32 or float64)."""
    cdef cnp.npy_intp n = c
    cdef cnp.ndarray a = cnp.PyArray_SimpleNew(1, &n, type_num)
    cdef Py_ssize_t i
    if type_num == cnp.NPY_FLOAT64:
        for i in range(c):
            (<double *>cnp.PyArray_DATA(a))[i] = values[i]
    else:
        for i in range(c):
            (<float *>cnp.PyArray_DATA(a))[i] = <float>values[i]
    return a


cdef object fast_call(bint train, object x, object axis, object epsilon, object out,
                      object mean, object variance, object gamma, object beta,
                      bint keep_params):
    """A fast call (see normalize_fast and train_fast), or None when it is not one."""
    cdef int ax = fast_axis(x, axis, epsilon, out)
    if ax < 0 or (not train and (mean is None or variance is None)):
        return None
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef Py_ssize_t c = cnp.PyArray_DIMS(a)[ax]
    cdef double small[4 * FAST_MAX_CHANNELS]
    cdef object large = heap_params(4 * c)
    cdef double *params = &small[0] if large is None else <double *>cnp.PyArray_DATA(large)
    # The core's order: gamma, beta, then room for the statistics it computes (training),
    # or mean, variance, gamma, beta (inference).
    cdef double *gamma_beta = params if train else params + 2 * c
    if not (fast_param(gamma, c, gamma_beta, 1.0) and fast_param(beta, c, gamma_beta + c, 0.0)):
        return None
    if not train and not (fast_param(mean, c, params, 0.0)
                          and fast_param(variance, c, params + c, 0.0)):
        return None
    cdef cnp.ndarray y = PyArray_NewLikeArray(a, cnp.NPY_KEEPORDER, NULL, 1) if out is None \
        else <cnp.ndarray>out
    cdef tensor_desc xd, yd
    describe(&xd, a, False)
    describe(&yd, y, False)
    cdef int32_t axes[1]
    axes[0] = ax
    cdef double eps = epsilon
    cdef bn_status st
    if cnp.PyArray_SIZE(a) < 32768:  # the core runs such calls on this thread anyway
        st = fast_core_call(train, &xd.t, &yd.t, axes, params, c, eps)
    else:
        with nogil:
            st = fast_core_call(train, &xd.t, &yd.t, axes, params, c, eps)
    check(st)
    cdef cnp.npy_intp dims[2]
    if keep_params:
        dims[0], dims[1] = 4, c
        kept = cnp.PyArray_SimpleNew(2, dims, cnp.NPY_FLOAT64)
        memcpy(cnp.PyArray_DATA(kept), params, 4 * c * sizeof(double))
        return y, kept
    if train:
        return (y, stats_array(params + 2 * c, c, cnp.PyArray_TYPE(a)),
                stats_array(params + 3 * c, c, cnp.PyArray_TYPE(a)))
    return y


def normalize_fast(object x, object mean, object variance, object gamma, object beta,
                   object axis, object epsilon, object out=None, bint keep_params=False):
    """``cbn.ops.batch_normalization`` for its common call — :func:`fast_axis`'s, with
    1-D float32/float64 parameters — or None when the call is anything else (the
    caller then takes the general path, which validates and explains). With
    keep_params, returns (y, the float64 parameters used as a (4, C) array)."""
    return fast_call(False, x, axis, epsilon, out, mean, variance, gamma, beta, keep_params)


def train_fast(object x, object gamma, object beta, object axis, object epsilon,
               object out=None, bint keep_params=False):
    """``cbn.ops.batch_norm_train`` for its common call — :func:`fast_axis`'s, with
    1-D float32/float64 gamma and beta (or None), no mask and no allreduce — as
    ``(y, mean, variance)`` (statistics in float64 for float64 input, else float32),
    or None when the call is anything else. With keep_params, returns (y, a float64
    (4, C) array of the gamma and beta used and the mean and variance computed)."""
    return fast_call(True, x, axis, epsilon, out, None, None, gamma, beta, keep_params)


def set_cache_bytes(int64_t l2, int64_t l3):
    check(bn_set_cache_bytes(l2, l3))


def get_cache_bytes():
    """(per-core L2, shared L3) in bytes, as the training forward uses them."""
    cdef int64_t l2 = 0, l3 = 0
    bn_get_cache_bytes(&l2, &l3)
    return l2, l3


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


# ---- team of threads under contention (appended in one piece) -----------------------

cdef extern from "bn_core/bn_core.h" nogil:
    ctypedef enum bn_team_policy:
        BN_TEAM_ADAPTIVE
        BN_TEAM_FULL
        BN_TEAM_CALLER_ONLY
    ctypedef struct bn_team_state:
        bn_team_policy policy
        double caller_only_ms
        int64_t parallel_calls
        int64_t late_calls
        int64_t caller_only_calls
    bn_status bn_set_team_policy(bn_team_policy policy)
    void bn_get_team_state(bn_team_state *state)

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
