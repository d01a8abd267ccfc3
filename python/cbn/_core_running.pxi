# Included by _core.pyx: the update of running (moving) statistics in one call, for
# cbn.torch's modules and the layer's small calls (a handful of NumPy or torch calls on
# small arrays cost several times more than the call they follow).


cdef bint f64_vector(object a, Py_ssize_t c):
    """Whether a is a contiguous 1-D float64 ndarray of c values."""
    if not cnp.PyArray_CheckExact(a):
        return False
    cdef cnp.ndarray v = <cnp.ndarray>a
    return (cnp.PyArray_NDIM(v) == 1 and cnp.PyArray_DIMS(v)[0] == c
            and cnp.PyArray_TYPE(v) == cnp.NPY_FLOAT64 and cnp.PyArray_IS_C_CONTIGUOUS(v))


cdef bint running_buffer(object a, Py_ssize_t c):
    """Whether a is a writeable 1-D float32 or float64 ndarray of c values (any stride)."""
    if not cnp.PyArray_CheckExact(a):
        return False
    cdef cnp.ndarray r = <cnp.ndarray>a
    cdef int type_num = cnp.PyArray_TYPE(r)
    return (cnp.PyArray_NDIM(r) == 1 and cnp.PyArray_DIMS(r)[0] == c
            and cnp.PyArray_ISWRITEABLE(r)
            and (type_num == cnp.NPY_FLOAT32 or type_num == cnp.NPY_FLOAT64))


cdef bint batch_counter(object a):
    """Whether a is a writeable 0-d int64 ndarray (num_batches_tracked's view)."""
    if not cnp.PyArray_CheckExact(a):
        return False
    cdef cnp.ndarray n = <cnp.ndarray>a
    return (cnp.PyArray_NDIM(n) == 0 and cnp.PyArray_TYPE(n) == cnp.NPY_INT64
            and cnp.PyArray_ISWRITEABLE(n))


cdef void blend_into(cnp.ndarray running, const double *batch, double scale, double keep,
                     double take) noexcept:
    """running[i] = running[i] * keep + take * (scale * batch[i]), in float64."""
    cdef char *data = <char *>cnp.PyArray_DATA(running)
    cdef Py_ssize_t i, stride = cnp.PyArray_STRIDES(running)[0]
    cdef double value
    if cnp.PyArray_TYPE(running) == cnp.NPY_FLOAT64:
        for i in range(cnp.PyArray_DIMS(running)[0]):
            value = (<double *>(data + i * stride))[0]
            (<double *>(data + i * stride))[0] = value * keep + take * (scale * batch[i])
    else:
        for i in range(cnp.PyArray_DIMS(running)[0]):
            value = (<float *>(data + i * stride))[0]
            (<float *>(data + i * stride))[0] = <float>(value * keep + take * (scale * batch[i]))


cdef bint statistics_and_buffers(object running_mean, object running_var, object mean,
                                 object variance):
    """Whether mean and variance are contiguous 1-D float64 arrays of one length, and the
    running buffers writeable 1-D float32/float64 arrays of it."""
    if not cnp.PyArray_CheckExact(mean):
        return False
    cdef Py_ssize_t c = cnp.PyArray_SIZE(<cnp.ndarray>mean)
    return (f64_vector(mean, c) and f64_vector(variance, c) and running_buffer(running_mean, c)
            and running_buffer(running_var, c))


def moving_average_fast(object moving_mean, object moving_variance, object mean,
                        object variance, double momentum):
    """Keras' update of a layer's moving statistics, ``moving * momentum + batch * (1 -
    momentum)`` in float64 (the layer's general path computes the same): the moving
    arrays 1-D float32 or float64 (any stride), the batch's contiguous float64 ones.
    Returns False, writing nothing, when an operand is anything else."""
    if not statistics_and_buffers(moving_mean, moving_variance, mean, variance):
        return False
    blend_into(<cnp.ndarray>moving_mean, <double *>cnp.PyArray_DATA(<cnp.ndarray>mean), 1.0,
               momentum, 1.0 - momentum)
    blend_into(<cnp.ndarray>moving_variance,
               <double *>cnp.PyArray_DATA(<cnp.ndarray>variance), 1.0, momentum,
               1.0 - momentum)
    return True


def running_average_fast(object running_mean, object running_var, object batches, object mean,
                         object variance, double unbiased, object momentum):
    """torch's update of a batch norm's running statistics, in float64 as its CPU kernel:
    ``batches`` (None, or num_batches_tracked as a 0-d int64 array) += 1, then
    ``running = (1 - w) * running + w * batch`` for the mean and for the variance times
    ``unbiased``, ``w`` the ``momentum`` or, when that is None, ``1 / batches``. The
    buffers are 1-D float32 or float64 arrays (any stride), the batch statistics contiguous
    float64 ones. Returns False, writing nothing, when an operand is anything else."""
    if not statistics_and_buffers(running_mean, running_var, mean, variance):
        return False
    if batches is None and momentum is None:  # a cumulative average needs the count
        return False
    if batches is not None and not batch_counter(batches):
        return False
    cdef double weight = 0.0 if momentum is None else momentum  # before anything is written
    cdef int64_t *count
    if batches is not None:
        count = <int64_t *>cnp.PyArray_DATA(<cnp.ndarray>batches)
        count[0] += 1
        if momentum is None:
            weight = 1.0 / <double>count[0]
    blend_into(<cnp.ndarray>running_mean, <double *>cnp.PyArray_DATA(<cnp.ndarray>mean), 1.0,
               1.0 - weight, weight)
    blend_into(<cnp.ndarray>running_var, <double *>cnp.PyArray_DATA(<cnp.ndarray>variance),
               unbiased, 1.0 - weight, weight)
    return True
