#include "compute_model.h"

#include <algorithm>
#include <cmath>

namespace memfit::sched {

namespace {
constexpr double kWeight = 0.05;  // of a new step in the running means (after the first few)

void update(double& mean, int64_t n, double x) {
  // The plain mean while there are few steps, then an exponential one.
  const double w = std::max(kWeight, 1.0 / static_cast<double>(n));
  mean += w * (x - mean);
}
}  // namespace

double ComputeModel::Stats::slowdown() const {
  if (solo_steps < kMinSteps || shared_steps < kMinSteps || shared_rate <= 0) return 0;
  return solo_rate / shared_rate;
}

double ComputeModel::Stats::compute() const {
  const double s = slowdown();
  if (s <= 0 || shared_jobs < 1.0) return 1.0;
  return std::clamp(std::max(s, 1.0) / shared_jobs, kMinCompute, 1.0);
}

void ComputeModel::observe(const std::string& kind, double rate, int jobs_on_device) {
  if (kind.empty() || !(rate > 0) || !std::isfinite(rate) || jobs_on_device < 1) return;
  auto it = kinds_.find(kind);
  if (it == kinds_.end()) {
    if (kinds_.size() >= kMaxKinds) {
      auto oldest = kinds_.begin();
      for (auto k = kinds_.begin(); k != kinds_.end(); ++k) {
        if (k->second.last_use < oldest->second.last_use) oldest = k;
      }
      kinds_.erase(oldest);
    }
    it = kinds_.emplace(kind, Stats{}).first;
  }
  Stats& s = it->second;
  s.last_use = ++clock_;
  if (jobs_on_device == 1) {
    update(s.solo_rate, ++s.solo_steps, rate);
  } else {
    ++s.shared_steps;
    update(s.shared_rate, s.shared_steps, rate);
    update(s.shared_jobs, s.shared_steps, static_cast<double>(jobs_on_device));
  }
}

double ComputeModel::compute(const std::string& kind) const {
  const auto it = kinds_.find(kind);
  return it == kinds_.end() ? 1.0 : it->second.compute();
}

std::optional<ComputeModel::Stats> ComputeModel::stats(const std::string& kind) const {
  const auto it = kinds_.find(kind);
  if (it == kinds_.end()) return std::nullopt;
  return it->second;
}

}  // namespace memfit::sched
