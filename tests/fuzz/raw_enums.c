#include "raw_enums.h"

bn_status fuzz_set_isa(int32_t isa) { return bn_set_isa((bn_isa)isa); }
bn_status fuzz_set_team_policy(int32_t policy) { return bn_set_team_policy((bn_team_policy)policy); }
const char *fuzz_isa_name(int32_t isa) { return bn_isa_name((bn_isa)isa); }
