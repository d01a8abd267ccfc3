// The "avx2" kernel table (flags from the file suffix; the entries are in
// <operation>_avx2.cpp).
#include "kernels/target_avx2.hpp"
#include "kernels/table.hpp"
