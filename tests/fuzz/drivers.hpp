// Contract-valid calls: run them and check every result against the reference.
#ifndef BN_FUZZ_DRIVERS_HPP
#define BN_FUZZ_DRIVERS_HPP

#include "call.hpp"

namespace fuzz {

// Runs c's scenario (a: its arguments, unbroken) and checks the results.
void run_and_check(const call &c, const args &a);

}  // namespace fuzz

#endif
