// Seeds for the counter-based dropout masks, drawn from ATen's default CPU generator so
// that at::manual_seed makes dropout reproducible.
#pragma once

#include <cstdint>

namespace memfit::ops::detail {

uint64_t next_dropout_seed();

}  // namespace memfit::ops::detail
