// Fitting a job to a device: the largest micro-batch (gradient accumulation keeps the
// requested global batch) and the cheapest memory options that fit in `device_bytes`.
//
// Option levels, cheapest first:
//   as-requested  the job's own memory options
//   exact-free    + memory-sharing norms, fused MLP tails, fused LM loss, memfit attention:
//                 exact gradients, no speed cost (memfit's kernels are faster than stock)
//   approx        + ReGELU2/ReSiLU2 (approximate activation backward, no speed cost)
//   checkpointing + activation checkpointing (about a third more compute): only when
//                 nothing fits without it
// The plan takes the level whose largest fitting micro-batch is largest (ties go to the
// cheaper level), never checkpointing unless no other level fits at all.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "estimator.h"

namespace memfit::estimator {

struct FitPlan {
  bool fits = false;
  int64_t device_bytes = 0;
  int64_t micro_batch = 0, gradient_accumulation = 0;  // micro_batch * accumulation = global batch
  spec::Memory memory;               // the options chosen
  std::string level;                 // as-requested, exact-free, approx, checkpointing
  Estimate estimate;                 // of the chosen plan (or of the smallest when nothing fits)
  int64_t smallest_bytes = 0;        // nothing fits: the least memory that would (micro-batch 1, every option)
  std::vector<std::string> reasons;  // what was chosen and why, for people
};

// The options of a level applied on top of `m`.
spec::Memory memory_for_level(const spec::Memory& m, const std::string& level);

FitPlan fit(const Input& in, int64_t device_bytes);

}  // namespace memfit::estimator
