// The "avx512" kernel table (flags from the file suffix; the entries are in
// <operation>_avx512.cpp).
#include "kernels/target_avx512.hpp"
#include "kernels/table.hpp"
