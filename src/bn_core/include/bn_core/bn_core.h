/* bn_core: exact, fast batch normalization on strided N-d buffers.
 *
 * C99 API. No C++ types or exceptions cross it: every function returns a
 * bn_status and, on failure, leaves a message readable with bn_last_error()
 * (thread-local, valid until the next failing call on the same thread).
 *
 * Layout terms: a tensor is (data, dtype, rank, shape, byte strides). "Channel
 * axes" are the normalized axes; statistics are per channel, where the channel
 * index runs row-major over the channel axes in increasing axis order
 * (C = product of their sizes). All other axes are reduced over.
 */
#ifndef BN_CORE_H
#define BN_CORE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32) && defined(BN_CORE_SHARED)
#  ifdef BN_CORE_BUILDING
#    define BN_API __declspec(dllexport)
#  else
#    define BN_API __declspec(dllimport)
#  endif
#elif defined(__GNUC__)
#  define BN_API __attribute__((visibility("default")))
#else
#  define BN_API
#endif

#define BN_MAX_RANK 64
/* Calls on fewer elements than this run on the calling thread (no OpenMP region). */
#define BN_SERIAL_THRESHOLD 32768

typedef enum bn_status {
  BN_OK = 0,
  BN_ERR_NULL = 1,        /* a required pointer is NULL */
  BN_ERR_RANK = 2,        /* rank out of [1, BN_MAX_RANK] */
  BN_ERR_SHAPE = 3,       /* negative size, mismatched shapes, bad broadcast */
  BN_ERR_AXIS = 4,        /* axis out of range or repeated */
  BN_ERR_DTYPE = 5,       /* unsupported or mismatched dtype */
  BN_ERR_OVERFLOW = 6,    /* sizes or byte offsets overflow int64 */
  BN_ERR_ALLOC = 7,       /* out of memory */
  BN_ERR_VALUE = 8,       /* a bad scalar argument (epsilon, thread count, ISA name) */
  BN_ERR_UNSUPPORTED = 9  /* e.g. a SIMD level this CPU lacks */
} bn_status;

typedef enum bn_dtype {
  BN_FLOAT32 = 0,
  BN_FLOAT64 = 1,
  BN_FLOAT16 = 2,  /* IEEE binary16; computed in float32 */
  BN_BFLOAT16 = 3, /* computed in float32 */
  BN_UINT8 = 4     /* masks only: non-zero means "use this position" */
} bn_dtype;

typedef struct bn_tensor {
  void *data;
  bn_dtype dtype;
  int32_t rank;
  const int64_t *shape;   /* rank sizes, each >= 0 */
  const int64_t *strides; /* rank strides in bytes, any sign, 0 allowed */
} bn_tensor;

typedef enum bn_isa { BN_ISA_SCALAR = 0, BN_ISA_AVX2 = 1, BN_ISA_AVX512 = 2 } bn_isa;

/* Per-channel masked moments: mean and biased variance (float64, C values
 * each); count (optional, may be NULL) receives the number of used positions.
 * mask may be NULL; otherwise a BN_UINT8 tensor of x's rank whose every size
 * equals x's or is 1 (broadcast). A channel with no used position gets mean 0
 * and variance 0. */
BN_API bn_status bn_moments(const bn_tensor *x, const int32_t *axes, int32_t n_axes,
                            const bn_tensor *mask, double *mean, double *variance,
                            double *count);

/* Inference: y = (x - mean) * gamma / sqrt(variance + epsilon) + beta per
 * channel. gamma/beta may be NULL (1 and 0). y has x's dtype and shape; y may
 * be x itself (in place) but must not partially overlap it. */
BN_API bn_status bn_normalize(const bn_tensor *x, const bn_tensor *y, const int32_t *axes,
                              int32_t n_axes, const double *mean, const double *variance,
                              const double *gamma, const double *beta, double epsilon);

/* Folding: an inference batch normalization that follows a linear layer (dense
 * or convolution) merged into that layer, so that linear'(x) = bn(linear(x)).
 * Per output channel o, with s = gamma[o] / sqrt(variance[o] + epsilon):
 *   weight_out[..., o, ...] = weight[..., o, ...] * s
 *   bias_out[o] = (bias[o] - mean[o]) * s + beta[o]
 * out_axis is weight's output-channel axis (negative counts from the end): 0 for
 * PyTorch's (out, in, kh, kw), -1 for Keras' (kh, kw, in, out) and (in, out).
 * Its size C is the length of bias, mean, variance, gamma, beta and bias_out;
 * bias, gamma and beta may be NULL (0, 1 and 0). weight_out has weight's dtype
 * and shape and may be weight itself; bias_out may be any of the arrays. The
 * factors are computed in float64; the weights are scaled in their compute type
 * (float64 for float64 weights, else float32) and rounded to their dtype. */
BN_API bn_status bn_fold(const bn_tensor *weight, const bn_tensor *weight_out, int32_t out_axis,
                         const double *bias, const double *mean, const double *variance,
                         const double *gamma, const double *beta, double epsilon,
                         double *bias_out);

/* Training forward: batch moments (masked as bn_moments) then normalization
 * of every position with them, in one call. mean/variance receive the batch
 * statistics (C values each). */
BN_API bn_status bn_train_forward(const bn_tensor *x, const bn_tensor *y, const int32_t *axes,
                                  int32_t n_axes, const bn_tensor *mask, const double *gamma,
                                  const double *beta, double epsilon, double *mean,
                                  double *variance);

/* Backward of y = (x - mean) / sqrt(variance + epsilon) * gamma + beta, per
 * channel (gamma may be NULL: 1). With x̂ = (x - mean) / sqrt(variance + epsilon):
 * - training != 0: through the batch statistics, which must be the (masked)
 *   moments of x that the forward used; with used positions w (the mask) and
 *   N = Σw per channel, dx = gamma / sqrt(variance + epsilon) *
 *   (dy - w / N * (Σdy + x̂ * Σdy·x̂)), the sums over every position;
 * - training == 0: fixed statistics, dx = gamma / sqrt(variance + epsilon) * dy.
 * sum_dy and sum_dy_xhat (C values each, may be NULL) receive Σdy (= dbeta) and
 * Σdy·x̂ (= dgamma) over every position. dy and dx have x's dtype and shape;
 * dx may be dy or x itself (same layout, in place) but must not partially
 * overlap either. */
BN_API bn_status bn_backward(const bn_tensor *dy, const bn_tensor *x, const bn_tensor *dx,
                             const int32_t *axes, int32_t n_axes, const bn_tensor *mask,
                             const double *mean, const double *variance, const double *gamma,
                             double epsilon, int32_t training, double *sum_dy,
                             double *sum_dy_xhat);

/* Fused epilogue: y = act(z + residual), z the normalized value, applied in
 * registers by the normalize walk itself (no extra pass over the data). The
 * activation is computed in the compute type (float for <=32-bit data, double
 * for float64):
 *   BN_ACT_IDENTITY   z                      BN_ACT_RELU   max(z, 0)
 *   BN_ACT_RELU6      min(max(z, 0), 6)      BN_ACT_LEAKY_RELU  z >= 0 ? z : alpha*z
 *   BN_ACT_CLIP       min(max(z, lo), hi)    BN_ACT_SILU   z * sigmoid(z)
 *   BN_ACT_GELU_TANH  0.5*z*(1 + tanh(sqrt(2/pi)*(z + 0.044715*z^3)))
 * (NaN stays NaN.) residual may be NULL; otherwise a tensor of x's shape and
 * dtype with any strides, which may be y itself or x itself but must not
 * partially overlap x or y. alpha must be finite; lo <= hi, neither NaN. */
typedef enum bn_activation {
  BN_ACT_IDENTITY = 0,
  BN_ACT_RELU = 1,
  BN_ACT_RELU6 = 2,
  BN_ACT_LEAKY_RELU = 3,
  BN_ACT_CLIP = 4,
  BN_ACT_SILU = 5,
  BN_ACT_GELU_TANH = 6
} bn_activation;

typedef struct bn_epilogue {
  bn_activation activation;
  double alpha;               /* BN_ACT_LEAKY_RELU's negative slope */
  double lo, hi;              /* BN_ACT_CLIP's bounds */
  const bn_tensor *residual;  /* NULL: none */
} bn_epilogue;

/* bn_normalize and bn_train_forward followed by the epilogue (NULL: none). */
BN_API bn_status bn_normalize_epilogue(const bn_tensor *x, const bn_tensor *y, const int32_t *axes,
                                       int32_t n_axes, const double *mean, const double *variance,
                                       const double *gamma, const double *beta, double epsilon,
                                       const bn_epilogue *epilogue);
BN_API bn_status bn_train_forward_epilogue(const bn_tensor *x, const bn_tensor *y, const int32_t *axes,
                                           int32_t n_axes, const bn_tensor *mask, const double *gamma,
                                           const double *beta, double epsilon, double *mean,
                                           double *variance, const bn_epilogue *epilogue);

/* Backward through the epilogue. g = dy * act'(z), the gradient at the
 * epilogue's input z = bn(x) + residual, with act' as PyTorch takes it at a
 * kink (relu: 0 at 0; relu6 and clip: 1 strictly inside the bounds only;
 * leaky relu: 1 above 0, alpha otherwise).
 *
 * bn_epilogue_gradient writes g (x's shape and dtype; it may be dy itself or
 * output itself, and must not otherwise overlap x, dy or the residual).
 * mean, variance, gamma (NULL: 1), beta (NULL: 0) and epsilon are the
 * forward's. output is the forward's y, or NULL; it is read only with a
 * residual, where relu, relu6, clip and leaky relu (alpha >= 0) take act'
 * from y's sign and bounds: one pass over dy and y instead of two over x, the
 * residual and dy (without a residual, one pass over x and dy forms z in
 * registers). In the two-pass case z is stored in x's dtype in between, so
 * for float16 and bfloat16 act' is taken at z rounded to it (as frameworks
 * running the normalization, the add and the activation as separate
 * operations do).
 *
 * bn_backward_epilogue is bn_backward with dy replaced by g: dx through the
 * activation, the residual add and the normalization (through the batch
 * statistics when training); sum_dy and sum_dy_xhat are Σg and Σg·x̂ (dbeta
 * and dgamma); dresidual (NULL: not wanted) receives g, and may be dy itself
 * but must not overlap x, dx or the residual otherwise. dx may be dy or x
 * itself, as in bn_backward. */
BN_API bn_status bn_epilogue_gradient(const bn_tensor *dy, const bn_tensor *x, const bn_tensor *g,
                                      const int32_t *axes, int32_t n_axes, const double *mean,
                                      const double *variance, const double *gamma,
                                      const double *beta, double epsilon,
                                      const bn_epilogue *epilogue, const bn_tensor *output);
BN_API bn_status bn_backward_epilogue(const bn_tensor *dy, const bn_tensor *x, const bn_tensor *dx,
                                      const int32_t *axes, int32_t n_axes, const bn_tensor *mask,
                                      const double *mean, const double *variance,
                                      const double *gamma, const double *beta, double epsilon,
                                      int32_t training, double *sum_dy, double *sum_dy_xhat,
                                      const bn_epilogue *epilogue, const bn_tensor *output,
                                      const bn_tensor *dresidual);

/* Distributed training: the statistics' phases around the caller's sum over
 * ranks (README.md, "Distributed training"). The core itself never communicates.
 *
 * Forward, phase 1: this rank's 3*C-value buffer, laid out as C counts n,
 * then C values n*(mean - K), then C values M2 + n*(mean - K)^2, with the
 * rank-local masked moments (as bn_moments) and a shift K every rank shares
 * (C values; NULL means 0). The merge is exact to about 1e-16 * (|mean - K| /
 * std)^2 relative, so K should be near the mean: the moving mean is the usual
 * choice (K = 0 on data with mean/std = 1e4 loses 1e-8 of the variance). */
BN_API bn_status bn_moments_partial(const bn_tensor *x, const int32_t *axes, int32_t n_axes,
                                    const bn_tensor *mask, const double *shift, double *partial);
/* Forward, phase 2: mean and biased variance (C values each) from the buffer
 * summed over ranks (Chan's merge, exact for any counts; 0 and 0 where N = 0). */
BN_API bn_status bn_moments_finalize(int64_t channels, const double *partial,
                                     const double *shift, double *mean, double *variance);
/* Backward, phase 1: this rank's used count, Σdy and Σdy·x̂ per channel (C
 * values each) for the global statistics mean/variance. */
BN_API bn_status bn_backward_sums(const bn_tensor *dy, const bn_tensor *x, const int32_t *axes,
                                  int32_t n_axes, const bn_tensor *mask, const double *mean,
                                  const double *variance, double epsilon, double *count,
                                  double *sum_dy, double *sum_dy_xhat);
/* Backward, phase 2: dx as bn_backward with training != 0, from the phase-1
 * values summed over ranks. */
BN_API bn_status bn_backward_apply(const bn_tensor *dy, const bn_tensor *x, const bn_tensor *dx,
                                   const int32_t *axes, int32_t n_axes, const bn_tensor *mask,
                                   const double *mean, const double *variance,
                                   const double *gamma, double epsilon, const double *count,
                                   const double *sum_dy, const double *sum_dy_xhat);

/* Number of threads used by later calls; n <= 0 restores the default
 * (OpenMP's, i.e. OMP_NUM_THREADS or the core count). A process created by
 * fork() starts at 1 (the parent's OpenMP threads do not exist in it) until it
 * calls bn_set_num_threads itself; n <= 0 there is safe only if the parent had
 * not run a parallel region yet. */
BN_API bn_status bn_set_num_threads(int32_t n);
BN_API int32_t bn_get_num_threads(void);

/* Cache sizes the schedules plan for: per-core L2 and shared L3 in bytes, read
 * from the system at first use. A tensor larger than half the L3 is processed
 * in chunks of channels, each normalized right after its statistics while
 * still cached; outputs that overflow the caches are written with streaming
 * stores. A detected L3 above 16 MiB per CPU sharing it (a VM reporting its
 * host's cache) is used as 16 MiB per CPU. A value <= 0 restores the detected
 * size. */
BN_API bn_status bn_set_cache_bytes(int64_t l2, int64_t l3);
BN_API void bn_get_cache_bytes(int64_t *l2, int64_t *l3);
/* Where the sizes bn_get_cache_bytes reports come from, in words (detected from
 * sysfs, capped, or set); valid until the calling thread's next call of it. */
BN_API const char *bn_cache_origin(void);

/* SIMD level: the best the CPU supports unless overridden. */
BN_API bn_isa bn_get_isa(void);
BN_API bn_isa bn_best_isa(void);
BN_API bn_status bn_set_isa(bn_isa isa);
/* Name form: "scalar", "avx2", "avx512" (or "" / NULL for the best). */
BN_API bn_status bn_set_isa_by_name(const char *name);
BN_API const char *bn_isa_name(bn_isa isa);

BN_API const char *bn_last_error(void);
BN_API const char *bn_version(void);
/* Compiler and OpenMP the library was built with, e.g. "GCC 12.2.0; OpenMP 201511". */
BN_API const char *bn_build_info(void);

/* How many threads a call actually runs on. Work is cut into as many parts as
 * bn_get_num_threads() allows (so results depend on that number only); the
 * calling thread does every part no helper has started. When a helper had not
 * started by the time the caller had done all the work (another process had its
 * core), later calls run on the caller alone for 10 ms, doubling up to 1 s while
 * probes find helpers late again; a call that finds another call of the process
 * running a team runs on its caller alone too (one team at a time, so callers
 * on several threads do not wake more threads than there are cores).
 * BN_TEAM_ADAPTIVE is the default;
 * BN_TEAM_FULL always wakes the whole team, BN_TEAM_CALLER_ONLY never does.
 * Results are bitwise the same under every policy. */
typedef enum bn_team_policy {
  BN_TEAM_ADAPTIVE = 0,
  BN_TEAM_FULL = 1,
  BN_TEAM_CALLER_ONLY = 2
} bn_team_policy;

typedef struct bn_team_state {
  bn_team_policy policy;
  double caller_only_ms;      /* time left running on the caller alone (0: team in use) */
  int64_t parallel_calls;     /* calls run on a team of threads */
  int64_t late_calls;         /* of those, calls where a helper started after all work was done */
  int64_t caller_only_calls;  /* calls that could use a team but ran on the caller alone */
} bn_team_state;

/* Sets the policy and forgets late helpers seen so far; BN_ERR_VALUE for an
 * unknown policy. */
BN_API bn_status bn_set_team_policy(bn_team_policy policy);
/* Counters are process-wide, since the library was loaded. */
BN_API void bn_get_team_state(bn_team_state *state);

#ifdef __cplusplus
}
#endif

#endif /* BN_CORE_H */
