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
// Every (micro-batch, accumulation, level) point that keeps the global batch is estimated:
// memory is not assumed monotonic in either. The plan takes the largest fitting
// micro-batch (ties go to the cheaper level), never checkpointing unless no other level
// fits at all; when nothing fits it names the point that needs the least.
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
  int64_t smallest_bytes = 0;        // nothing fits: the least any point needs (that point is the plan)
  int64_t points_searched = 0;
  std::vector<std::string> reasons;  // what was chosen and why, for people
};

// One searched point: its level (index into the distinct option sets), micro-batch, and
// estimated peak (0: beyond any device).
struct FitPoint {
  int level = 0;
  int64_t micro_batch = 0;
  bool checkpointing = false;
  int64_t peak_bytes = 0;
};

// The decision, pure: the index of the chosen point. With something fitting (*fits):
// no checkpointing if any point without it fits, then the largest micro-batch, then the
// cheaper level. Otherwise the point needing the least memory; -1 if none estimates.
int choose_point(const std::vector<FitPoint>& points, int64_t device_bytes, bool* fits);

// The options of a level applied on top of `m`.
spec::Memory memory_for_level(const spec::Memory& m, const std::string& level);

FitPlan fit(const Input& in, int64_t device_bytes);

}  // namespace memfit::estimator
