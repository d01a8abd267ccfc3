/* The config entry points with any int as their enum argument, as a C caller
 * may pass it (in C++, forming an enum value outside its range is undefined). */
#ifndef BN_FUZZ_RAW_ENUMS_H
#define BN_FUZZ_RAW_ENUMS_H

#include "bn_core/bn_core.h"

#ifdef __cplusplus
extern "C" {
#endif

bn_status fuzz_set_isa(int32_t isa);
bn_status fuzz_set_team_policy(int32_t policy);
const char *fuzz_isa_name(int32_t isa);

#ifdef __cplusplus
}
#endif

#endif
