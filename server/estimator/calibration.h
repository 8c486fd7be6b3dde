// Learning from measured peaks. Finished jobs report (estimate, measured peak); the
// correction for later jobs of the same kind, keyed by (architecture, memory options,
// device kind), is the largest recent measured/estimated ratio plus 1% headroom, so a
// reservation covers every recent job of that kind. It is bounded:
//   - it never goes below 1 - kMaxShrink (5%) of the raw estimate, and not below 1 at all
//     until kMinToShrink observations agree, so one low outlier cannot shrink a
//     reservation by more than 5%;
//   - it never goes above kMaxGrow (2x): a larger miss means the model is wrong for that
//     kind of job, which the ratio reports (needs_review) instead of hiding.
// Only the last kWindow observations per key count, so old behaviour ages out. The daemon
// owns persistence: it stores observations() and feeds them back with add().
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <string>
#include <vector>

#include "estimator.h"

namespace memfit::estimator {

struct Observation {
  std::string key;
  int64_t estimated_bytes = 0;
  int64_t measured_bytes = 0;
};

class Calibration {
 public:
  static constexpr double kMaxShrink = 0.05;
  static constexpr double kHeadroom = 0.01;
  static constexpr double kMaxGrow = 2.0;
  static constexpr size_t kMinToShrink = 3;
  static constexpr size_t kWindow = 20;

  // "gpt2|approx+ms_norm+fused_mlp+fused_loss+attention|cuda"
  static std::string key_of(const Input& in);

  // Throws EstimateError on non-positive byte counts.
  void add(const Observation& o);
  // The multiplier for estimates of this kind (1 when nothing is known).
  double factor(const std::string& key) const;
  // estimated_bytes * factor, rounded up.
  int64_t apply(const std::string& key, int64_t estimated_bytes) const;
  // Whether the latest ratios of this kind exceed what the bound lets the factor cover.
  bool needs_review(const std::string& key) const;
  std::vector<Observation> observations() const;

 private:
  std::map<std::string, std::deque<Observation>> by_key_;
};

}  // namespace memfit::estimator
