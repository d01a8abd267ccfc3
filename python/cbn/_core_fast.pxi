# Included by _core.pyx: the small common call of ops.batch_normalization and
# ops.batch_norm_train, with or without a fused epilogue (and the layer's plain calls),
# and of ops.batch_norm_backward without one, without the general validation.

from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongAndOverflow
from libc.math cimport isfinite

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
    if not cnp.PyArray_CheckExact(p):
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


cdef bint fast_like(object o, cnp.ndarray a):
    """Whether o is an ndarray of a's dtype and shape."""
    return cnp.PyArray_CheckExact(o) and cnp.PyArray_TYPE(<cnp.ndarray>o) == cnp.PyArray_TYPE(a) \
        and cnp.PyArray_SAMESHAPE(<cnp.ndarray>o, a)


cdef bint fast_out(object out, cnp.ndarray a):
    """Whether out can take a's output on the fast path: a writeable ndarray of a's
    dtype and shape, with no stride-0 axis, that is a's own view (in place) or shares
    no byte with it."""
    if not fast_like(out, a) or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>out):
        return False
    cdef cnp.ndarray o = <cnp.ndarray>out
    cdef int d
    cdef bint same_view = cnp.PyArray_DATA(o) == cnp.PyArray_DATA(a)
    for d in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIMS(o)[d] > 1 and cnp.PyArray_STRIDES(o)[d] == 0:
            return False  # a broadcast output: the general path says why it is refused
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
    if not cnp.PyArray_CheckExact(x) or type(axis) is not int or type(epsilon) is not float:
        return -1
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef int type_num = cnp.PyArray_TYPE(a)
    cdef int rank = cnp.PyArray_NDIM(a)
    if (type_num != cnp.NPY_FLOAT32 and type_num != cnp.NPY_FLOAT64) or rank < 1 \
            or rank > BN_MAX_RANK:
        return -1
    cdef int overflow = 0
    cdef long ax = PyLong_AsLongAndOverflow(axis, &overflow)  # 10**30 sets overflow
    if overflow or not -rank <= ax < rank:
        return -1
    if ax < 0:
        ax += rank
    cdef double eps = PyFloat_AS_DOUBLE(epsilon)
    if not (0.0 <= eps and isfinite(eps)):
        return -1
    if out is not None and not fast_out(out, a):
        return -1
    return ax


cdef bint fast_real(object v, double *out):
    """v as a double when it is a float, or an int (not a bool) a double holds."""
    if type(v) is not float and type(v) is not int:
        return False
    try:
        out[0] = v
    except OverflowError:
        return False
    return True


cdef bint fast_bounds(object clip, double *lo_hi):
    """clip's (lo, hi) when it is a tuple or list of two reals (fast_real's), lo <= hi."""
    if (type(clip) is not tuple and type(clip) is not list) or len(clip) != 2:
        return False
    return fast_real(clip[0], lo_hi) and fast_real(clip[1], lo_hi + 1) and lo_hi[0] <= lo_hi[1]


cdef int fast_code(object activation, object alpha, object clip, double *bounds) except -2:
    """The core's code of activation when (activation, alpha, clip) make a fast call — None
    or a name of ACTIVATIONS, a finite real alpha, clip :func:`fast_bounds`' with "clip"
    and None otherwise — with (alpha, lo, hi) in bounds; else -1."""
    cdef int code = BN_ACT_IDENTITY
    if activation is not None:
        found = ACTIVATIONS.get(activation) if type(activation) is str else None
        if found is None:
            return -1
        code = found
    if not fast_real(alpha, bounds) or not isfinite(bounds[0]):
        return -1
    bounds[1] = bounds[2] = 0.0
    if code == BN_ACT_CLIP:
        return code if fast_bounds(clip, bounds + 1) else -1
    return code if clip is None else -1


cdef bint fast_epilogue(epilogue_desc *d, const bn_epilogue **ep, cnp.ndarray a, object out,
                        object activation, object alpha, object clip,
                        object residual) except -1:
    """Whether the epilogue arguments make a fast call on a — :func:`fast_code`'s, and no
    residual or an ndarray of a's dtype and shape that is out's own view or shares no
    byte with it — and then *ep: d describing them, or NULL when there is nothing to fuse."""
    cdef double bounds[3]
    cdef int code = fast_code(activation, alpha, clip, bounds)
    if code < 0 or (residual is not None and not (
            fast_like(residual, a) and (out is None or fast_out(out, residual)))):
        return False
    ep[0] = NULL
    if code != BN_ACT_IDENTITY or residual is not None:
        ep[0] = set_epilogue(d, code, bounds[0], bounds[1], bounds[2], residual)
    return True


cdef object heap_params(Py_ssize_t values):
    """None when values float64s fit the caller's stack buffer of 4 * FAST_MAX_CHANNELS
    (a heap array costs more than a tiny call), else a new array of them."""
    return None if values <= 4 * FAST_MAX_CHANNELS else np.empty(values)


cdef bn_status fast_core_call(bint train, const bn_tensor *x, const bn_tensor *y,
                              const int32_t *axes, double *params, Py_ssize_t c, double eps,
                              const bn_epilogue *ep) noexcept nogil:
    """The core call of a fast call; params holds 4 * c values: (mean, variance, gamma,
    beta) to normalize with, or (gamma, beta) then room for (mean, variance) to train."""
    if train:
        return bn_train_forward_epilogue(x, y, axes, 1, NULL, params, params + c, eps,
                                         params + 2 * c, params + 3 * c, ep)
    return bn_normalize_epilogue(x, y, axes, 1, params, params + c, params + 2 * c,
                                 params + 3 * c, eps, ep)


cdef int fast_run(bint train, cnp.ndarray a, cnp.ndarray y, int ax, double *params,
                  Py_ssize_t c, double eps, const bn_epilogue *ep) except -1:
    """fast_core_call on a and y, without the GIL when the core may use threads."""
    cdef tensor_desc xd, yd
    describe(&xd, a, False)
    describe(&yd, y, False)
    cdef int32_t axes[1]
    axes[0] = ax
    cdef bn_status st
    if cnp.PyArray_SIZE(a) < BN_SERIAL_THRESHOLD:  # the core runs these on this thread anyway
        st = fast_core_call(train, &xd.t, &yd.t, axes, params, c, eps, ep)
    else:
        with nogil:
            st = fast_core_call(train, &xd.t, &yd.t, axes, params, c, eps, ep)
    return check(st)


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


cdef object fast_result(bint train, bint keep_params, cnp.ndarray y, const double *params,
                        Py_ssize_t c):
    """What a fast call returns: y (normalize_fast), (y, mean, variance) (train_fast), or
    (y, the 4 * c params as a (4, c) float64 array) with keep_params."""
    cdef cnp.npy_intp dims[2]
    if keep_params:
        dims[0], dims[1] = 4, c
        kept = cnp.PyArray_SimpleNew(2, dims, cnp.NPY_FLOAT64)
        memcpy(cnp.PyArray_DATA(kept), params, 4 * c * sizeof(double))
        return y, kept
    if train:
        return (y, stats_array(params + 2 * c, c, cnp.PyArray_TYPE(y)),
                stats_array(params + 3 * c, c, cnp.PyArray_TYPE(y)))
    return y


cdef object fast_call(bint train, object x, object axis, object epsilon, object out,
                      object mean, object variance, object gamma, object beta,
                      object activation, object alpha, object clip, object residual,
                      bint keep_params):
    """A fast call (see normalize_fast and train_fast), or None when it is not one."""
    cdef int ax = fast_axis(x, axis, epsilon, out)
    if ax < 0 or (not train and (mean is None or variance is None)):
        return None
    cdef cnp.ndarray a = <cnp.ndarray>x
    cdef epilogue_desc ed
    cdef const bn_epilogue *ep
    if not fast_epilogue(&ed, &ep, a, out, activation, alpha, clip, residual):
        return None
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
    fast_run(train, a, y, ax, params, c, epsilon, ep)
    return fast_result(train, keep_params, y, params, c)


def normalize_fast(object x, object mean, object variance, object gamma, object beta,
                   object axis, object epsilon, object out=None, object activation=None,
                   object activation_alpha=0.01, object clip=None, object residual=None,
                   bint keep_params=False):
    """``cbn.ops.batch_normalization`` for its common call — :func:`fast_axis`'s, with
    1-D float32/float64 parameters and :func:`fast_epilogue`'s epilogue arguments — or
    None when the call is anything else (the caller then takes the general path, which
    validates and explains). With keep_params, returns (y, the float64 parameters used
    as a (4, C) array)."""
    return fast_call(False, x, axis, epsilon, out, mean, variance, gamma, beta, activation,
                     activation_alpha, clip, residual, keep_params)


def train_fast(object x, object gamma, object beta, object axis, object epsilon,
               object out=None, object activation=None, object activation_alpha=0.01,
               object clip=None, object residual=None, bint keep_params=False):
    """``cbn.ops.batch_norm_train`` for its common call — :func:`fast_axis`'s, with
    1-D float32/float64 gamma and beta (or None), :func:`fast_epilogue`'s epilogue
    arguments, no mask and no allreduce — as ``(y, mean, variance)`` (statistics in
    float64 for float64 input, else float32), or None when the call is anything else.
    With keep_params, returns (y, a float64 (4, C) array of the gamma and beta used and
    the mean and variance computed)."""
    return fast_call(True, x, axis, epsilon, out, None, None, gamma, beta, activation,
                     activation_alpha, clip, residual, keep_params)


cdef bn_status fast_backward_call(const bn_tensor *dy, const bn_tensor *x, const bn_tensor *dx,
                                  const int32_t *axes, double *params, Py_ssize_t c,
                                  double eps, bint training) noexcept nogil:
    """The core call of backward_fast; params holds (mean, variance, gamma) and then room
    for (Σdy, Σdy·x̂), c values each."""
    return bn_backward(dy, x, dx, axes, 1, NULL, params, params + c, params + 2 * c, eps,
                       training, params + 3 * c, params + 4 * c)


def backward_fast(object dy, object x, object mean, object variance, object gamma,
                  object axis, object epsilon, object training, object out=None,
                  object activation=None, object activation_alpha=0.01, object clip=None):
    """``cbn.ops.batch_norm_backward`` for its common call — :func:`fast_axis`'s x, axis,
    epsilon and out (which must also be dy's own view or share no byte with it), dy an
    ndarray of x's dtype and shape, 1-D float32/float64 mean and variance, gamma likewise
    or None, a bool training, and epilogue arguments that fuse nothing (:func:`fast_code`'s
    identity) — as ``(dx, dgamma, dbeta)`` (float64 for float64 input, else float32), or
    None when the call is anything else. The caller passes no mask, allreduce, beta,
    residual or output."""
    cdef double bounds[3]
    cdef int ax = fast_axis(x, axis, epsilon, out)
    if ax < 0 or type(training) is not bool or mean is None or variance is None:
        return None
    cdef cnp.ndarray a = <cnp.ndarray>x
    if not fast_like(dy, a) or (out is not None and not fast_out(out, <cnp.ndarray>dy)) \
            or fast_code(activation, activation_alpha, clip, bounds) != BN_ACT_IDENTITY:
        return None
    cdef Py_ssize_t c = cnp.PyArray_DIMS(a)[ax]
    cdef double small[4 * FAST_MAX_CHANNELS]
    cdef object large = heap_params(5 * c)
    cdef double *params = &small[0] if large is None else <double *>cnp.PyArray_DATA(large)
    if not (fast_param(mean, c, params, 0.0) and fast_param(variance, c, params + c, 0.0)
            and fast_param(gamma, c, params + 2 * c, 1.0)):
        return None
    cdef cnp.ndarray dx = PyArray_NewLikeArray(a, cnp.NPY_KEEPORDER, NULL, 1) if out is None \
        else <cnp.ndarray>out
    cdef tensor_desc dyd, xd, dxd
    describe(&dyd, <cnp.ndarray>dy, False)
    describe(&xd, a, False)
    describe(&dxd, dx, False)
    cdef int32_t axes[1]
    axes[0] = ax
    cdef double eps = epsilon
    cdef bint train = training
    cdef bn_status st
    if cnp.PyArray_SIZE(a) < BN_SERIAL_THRESHOLD:  # the core runs these on this thread anyway
        st = fast_backward_call(&dyd.t, &xd.t, &dxd.t, axes, params, c, eps, train)
    else:
        with nogil:
            st = fast_backward_call(&dyd.t, &xd.t, &dxd.t, axes, params, c, eps, train)
    check(st)
    return (dx, stats_array(params + 4 * c, c, cnp.PyArray_TYPE(a)),
            stats_array(params + 3 * c, c, cnp.PyArray_TYPE(a)))
