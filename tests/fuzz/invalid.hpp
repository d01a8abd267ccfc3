// Breaking one argument of a valid call, each in a way the contract rejects,
// and the status the core must return for it.
#ifndef BN_FUZZ_INVALID_HPP
#define BN_FUZZ_INVALID_HPP

#include "call.hpp"

namespace fuzz {

// Breaks one argument of op's call in a (filled from a valid call) and
// returns the expected status; BN_OK when op has no such argument to break.
bn_status break_one_argument(generator &g, entry op, args &a);

}  // namespace fuzz

#endif
