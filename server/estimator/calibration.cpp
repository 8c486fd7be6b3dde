#include "calibration.h"

#include <algorithm>
#include <cmath>

namespace memfit::estimator {

std::string Calibration::key_of(const Input& in) {
  const spec::Memory& m = in.job.memory;
  std::string opts;
  auto add = [&](bool on, const char* name) {
    if (on) opts += (opts.empty() ? "" : "+") + std::string(name);
  };
  add(m.approx_activation, "approx");
  add(m.memory_sharing_norm, "ms_norm");
  add(m.fused_mlp || m.preset == "memfit_best", "fused_mlp");
  add(m.fused_loss, "fused_loss");
  add(m.efficient_attention, "attention");
  add(m.checkpointing, "checkpointing");
  if (opts.empty()) opts = "none";
  return std::string(spec::name_of(in.job.architecture)) + "|" + opts + "|" + in.device.kind_name();
}

void Calibration::add(const Observation& o) {
  if (o.key.empty()) throw EstimateError("calibration: observation without a key");
  if (o.estimated_bytes <= 0) throw EstimateError("calibration: estimated_bytes must be positive");
  if (o.measured_bytes <= 0) throw EstimateError("calibration: measured_bytes must be positive");
  auto& q = by_key_[o.key];
  q.push_back(o);
  while (q.size() > kWindow) q.pop_front();
}

double Calibration::factor(const std::string& key) const {
  const auto it = by_key_.find(key);
  if (it == by_key_.end() || it->second.empty()) return 1.0;
  double worst = 0.0;
  for (const auto& o : it->second) {
    worst = std::max(worst, static_cast<double>(o.measured_bytes) / static_cast<double>(o.estimated_bytes));
  }
  const double floor = it->second.size() >= kMinToShrink ? 1.0 - kMaxShrink : 1.0;
  return std::clamp(worst * (1.0 + kHeadroom), floor, kMaxGrow);
}

int64_t Calibration::apply(const std::string& key, int64_t estimated_bytes) const {
  if (estimated_bytes <= 0) return estimated_bytes;
  const double v = std::ceil(static_cast<double>(estimated_bytes) * factor(key));
  if (v >= 9.0e18) throw EstimateError("calibration: corrected estimate exceeds 2^63 bytes");
  return static_cast<int64_t>(v);
}

bool Calibration::needs_review(const std::string& key) const {
  const auto it = by_key_.find(key);
  if (it == by_key_.end()) return false;
  for (const auto& o : it->second) {
    if (static_cast<double>(o.measured_bytes) * (1.0 + kHeadroom) > static_cast<double>(o.estimated_bytes) * kMaxGrow) {
      return true;
    }
  }
  return false;
}

std::vector<Observation> Calibration::observations() const {
  std::vector<Observation> out;
  for (const auto& [k, q] : by_key_) out.insert(out.end(), q.begin(), q.end());
  return out;
}

}  // namespace memfit::estimator
