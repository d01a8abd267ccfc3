"""C declarations of bn_core.h used by _core.pyx (Cython reads this file for the module)."""

from libc.stdint cimport int32_t, int64_t

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
    enum:
        BN_MAX_RANK
        BN_SERIAL_THRESHOLD
    bn_status bn_moments(const bn_tensor *x, const int32_t *axes, int32_t n_axes,
                         const bn_tensor *mask, double *mean, double *variance, double *count)
    bn_status bn_normalize(const bn_tensor *x, const bn_tensor *y, const int32_t *axes,
                           int32_t n_axes, const double *mean, const double *variance,
                           const double *gamma, const double *beta, double epsilon)
    bn_status bn_fold(const bn_tensor *weight, const bn_tensor *weight_out, int32_t out_axis,
                      const double *bias, const double *mean, const double *variance,
                      const double *gamma, const double *beta, double epsilon,
                      double *bias_out)
    bn_status bn_train_forward(const bn_tensor *x, const bn_tensor *y, const int32_t *axes,
                               int32_t n_axes, const bn_tensor *mask, const double *gamma,
                               const double *beta, double epsilon, double *mean, double *variance)
    bn_status bn_backward(const bn_tensor *dy, const bn_tensor *x, const bn_tensor *dx,
                          const int32_t *axes, int32_t n_axes, const bn_tensor *mask,
                          const double *mean, const double *variance, const double *gamma,
                          double epsilon, int32_t training, double *sum_dy, double *sum_dy_xhat)
    ctypedef enum bn_activation:
        BN_ACT_IDENTITY
        BN_ACT_RELU
        BN_ACT_RELU6
        BN_ACT_LEAKY_RELU
        BN_ACT_CLIP
        BN_ACT_SILU
        BN_ACT_GELU_TANH
    ctypedef struct bn_epilogue:
        bn_activation activation
        double alpha
        double lo
        double hi
        const bn_tensor *residual
    bn_status bn_normalize_epilogue(const bn_tensor *x, const bn_tensor *y, const int32_t *axes,
                                    int32_t n_axes, const double *mean, const double *variance,
                                    const double *gamma, const double *beta, double epsilon,
                                    const bn_epilogue *epilogue)
    bn_status bn_train_forward_epilogue(const bn_tensor *x, const bn_tensor *y,
                                        const int32_t *axes, int32_t n_axes,
                                        const bn_tensor *mask, const double *gamma,
                                        const double *beta, double epsilon, double *mean,
                                        double *variance, const bn_epilogue *epilogue)
    bn_status bn_epilogue_gradient(const bn_tensor *dy, const bn_tensor *x, const bn_tensor *g,
                                   const int32_t *axes, int32_t n_axes, const double *mean,
                                   const double *variance, const double *gamma,
                                   const double *beta, double epsilon,
                                   const bn_epilogue *epilogue, const bn_tensor *output)
    bn_status bn_backward_epilogue(const bn_tensor *dy, const bn_tensor *x, const bn_tensor *dx,
                                   const int32_t *axes, int32_t n_axes, const bn_tensor *mask,
                                   const double *mean, const double *variance,
                                   const double *gamma, const double *beta, double epsilon,
                                   int32_t training, double *sum_dy, double *sum_dy_xhat,
                                   const bn_epilogue *epilogue, const bn_tensor *output,
                                   const bn_tensor *dresidual)
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
    const char *bn_cache_origin()
    int32_t bn_get_num_threads()
    bn_isa bn_get_isa()
    bn_isa bn_best_isa()
    bn_status bn_set_isa_by_name(const char *name)
    const char *bn_isa_name(bn_isa isa)
    const char *bn_last_error()
    const char *bn_version()
    const char *bn_build_info()
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
