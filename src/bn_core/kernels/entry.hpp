// Defines the entry of the operation the including translation unit names
// (BN_KERNEL_MOMENTS, BN_KERNEL_MOMENTS_FINISH, BN_KERNEL_NORMALIZE,
// BN_KERNEL_NORMALIZE_EPILOGUE, BN_KERNEL_NORMALIZE_PIECEWISE,
// BN_KERNEL_BACKWARD_SUMS or BN_KERNEL_BACKWARD_APPLY): the element type
// dispatch into that operation.
#include "all.hpp"
#include "entries.hpp"

namespace bn_core {
namespace BN_ISA_NS {

#if defined(BN_KERNEL_MOMENTS)
void moments_entry(const plan &p, int64_t item_begin, int64_t item_end, const moments_scratch &s) {
  with_element_type(p.dtype, [&](auto elem) {
    moments_items<decltype(elem)>(p, item_begin, item_end, s);
  });
}
#elif defined(BN_KERNEL_MOMENTS_FINISH)
bool finish_moments_entry(const moments_scratch &slot0, int64_t slot_stride, int32_t team, int64_t channels,
                          double *mean, double *variance, double *count) {
  for (int32_t s = 1; s < team; ++s) {
    const int64_t moved = s * slot_stride;
    chan_merge_channels(slot0.count + moved, slot0.mean + moved, slot0.m2 + moved, channels, slot0.count,
                        slot0.mean, slot0.m2);
  }
  return statistics_of_merged(slot0.count, slot0.mean, slot0.m2, team > 0, channels, mean, variance, count);
}
#elif defined(BN_KERNEL_NORMALIZE)
void normalize_entry(const plan &p, int64_t item_begin, int64_t item_end, const affine_params &a) {
  with_element_type(p.dtype, [&](auto elem) {
    normalize_items<decltype(elem), no_epilogue>(p, item_begin, item_end, a);
  });
}
#elif defined(BN_KERNEL_NORMALIZE_EPILOGUE)
void normalize_epilogue_entry(const plan &p, int64_t item_begin, int64_t item_end, const affine_params &a) {
  with_element_type(p.dtype, [&](auto elem) {
    using E = decltype(elem);
    normalize_items<E, with_epilogue<typename E::acc, activation>>(p, item_begin, item_end, a);
  });
}
#elif defined(BN_KERNEL_NORMALIZE_PIECEWISE)
void normalize_piecewise_entry(const plan &p, int64_t item_begin, int64_t item_end, const affine_params &a) {
  with_element_type(p.dtype, [&](auto elem) {
    using E = decltype(elem);
    normalize_items<E, with_epilogue<typename E::acc, clamp_activation>>(p, item_begin, item_end, a);
  });
}
#elif defined(BN_KERNEL_BACKWARD_SUMS)
void backward_sums_entry(const plan &p, int64_t item_begin, int64_t item_end,
                         const backward_params &b, const backward_scratch &s) {
  with_element_type(p.dtype, [&](auto elem) {
    backward_sums_items<decltype(elem)>(p, item_begin, item_end, b, s);
  });
}
#elif defined(BN_KERNEL_BACKWARD_APPLY)
void backward_apply_entry(const plan &p, int64_t item_begin, int64_t item_end,
                          const backward_params &b) {
  with_element_type(p.dtype, [&](auto elem) {
    backward_apply_items<decltype(elem)>(p, item_begin, item_end, b);
  });
}
#else
#error "define the operation (BN_KERNEL_MOMENTS, ...) before including kernels/entry.hpp"
#endif

}  // namespace BN_ISA_NS
}  // namespace bn_core
