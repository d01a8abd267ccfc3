// The kernel source, in order: a table of contents. Each part opens
// bn_core::BN_ISA_NS::(anonymous) itself, so no symbol compiled with one ISA's
// flags can be shared with (and picked by the linker for) another ISA's code.
// Included by the per-operation translation units <operation>_<isa>.cpp, after
// kernels/target_<isa>.hpp has named the ISA (BN_ISA_NS, BN_VEC_BYTES).
//
// Statistics: per channel, short blocks of shifted sums Σ(x−K), Σ(x−K)² in the
// accumulator type, with K the channel's running mean (two-pass mean of its
// first block), folded into float64 (count, mean, M2) with Chan's merge. Plain
// sum speed, two-pass accuracy. Vocabulary (rows, planes, runs, tiles, folded
// rows, segments): src/bn_core/README.md.
//
// Functions split out of a longer walk only so that it reads in parts are
// [[gnu::always_inline]]: they compile as if written in their caller, so the
// split leaves the inliner's choices, and the generated code, as they were.
#if !defined(BN_ISA_NS) || !defined(BN_VEC_BYTES)
#error "include kernels/target_<isa>.hpp before kernels/all.hpp"
#endif

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "../plan.hpp"

#include "simd.hpp"                          // vector types, stores, element types
#include "walks.hpp"                         // tiles of channels; runs, folded rows, segments
#include "epilogue.hpp"                      // activations; plain and epilogue normalize variants
#include "shifted_sums.hpp"                  // shifted sums, Chan's merge, the team's partials
#include "moments_channels_first.hpp"        // statistics of planes x L (any stride, masked)
#include "moments_channels_last.hpp"         // statistics of rows x C (any stride, masked)
#include "normalize_channels_first.hpp"      // normalize planes and strided segments
#include "normalize_channels_last.hpp"       // normalize rows x C in register tiles
#include "backward_lines.hpp"                // backward sums and dx of any segment
#include "backward_channels_last.hpp"        // backward sums and dx of rows x C in tiles
#include "operations.hpp"                    // the walk per operation and layout; dtype dispatch
