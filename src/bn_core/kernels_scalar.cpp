// The "scalar" kernel table (flags from the file suffix; the entries are in
// <operation>_scalar.cpp).
#include "kernels/target_scalar.hpp"
#include "kernels/table.hpp"
