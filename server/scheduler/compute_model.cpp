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

ComputeModel::Stats& ComputeModel::slot(const std::string& kind) {
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
  it->second.last_use = ++clock_;
  return it->second;
}

void ComputeModel::restore(const std::string& kind, const Stats& st) {
  auto ok = [](double x) { return std::isfinite(x) && x >= 0; };
  if (kind.empty() || st.solo_steps < 0 || st.shared_steps < 0 || !ok(st.solo_rate) || !ok(st.shared_rate) ||
      !ok(st.shared_jobs) || (st.shared_steps > 0 && st.shared_jobs < 1.0)) {
    return;
  }
  Stats& s = slot(kind);
  const int64_t use = s.last_use;
  s = st;
  s.last_use = use;
}

void ComputeModel::observe(const std::string& kind, double rate, int jobs_on_device) {
  if (kind.empty() || !(rate > 0) || !std::isfinite(rate) || jobs_on_device < 1) return;
  Stats& s = slot(kind);
  if (jobs_on_device == 1) {
    update(s.solo_rate, ++s.solo_steps, rate);
  } else {
    ++s.shared_steps;
    update(s.shared_rate, s.shared_steps, rate);
    update(s.shared_jobs, s.shared_steps, static_cast<double>(jobs_on_device));
  }
}

std::optional<KindShape> SplitComputeKind(const std::string& kind) {
  const size_t bar = kind.rfind('|');
  if (bar == std::string::npos) return std::nullopt;
  const std::string shape = kind.substr(bar + 1);
  const size_t x = shape.find('x');
  if (x == 0 || x == std::string::npos || x + 1 == shape.size()) return std::nullopt;
  double dims[2] = {0, 0};
  const std::string parts[2] = {shape.substr(0, x), shape.substr(x + 1)};
  for (int i = 0; i < 2; ++i) {
    if (parts[i].size() > 9 || parts[i].find_first_not_of("0123456789") != std::string::npos) return std::nullopt;
    dims[i] = std::stod(parts[i]);
    if (dims[i] <= 0) return std::nullopt;
  }
  return KindShape{kind.substr(0, bar), dims[0], dims[1]};
}

double ComputeModel::compute(const std::string& kind) const {
  const auto it = kinds_.find(kind);
  if (it != kinds_.end() && it->second.slowdown() > 0) return it->second.compute();
  const auto self = SplitComputeKind(kind);
  if (!self) return 1.0;
  double best_distance = 0, bound = 1.0;
  bool found = false;
  // Family members sort together, from "<family>|" on.
  const std::string prefix = self->family + "|";
  for (auto k = kinds_.lower_bound(prefix); k != kinds_.end() && k->first.compare(0, prefix.size(), prefix) == 0; ++k) {
    if (k->second.slowdown() <= 0) continue;
    const auto other = SplitComputeKind(k->first);
    if (!other || other->family != self->family) continue;  // a longer family name with this prefix
    const double b = self->batch / other->batch, l = self->length / other->length;
    const double r = b * l * std::max(1.0, l);  // at most this many times the work
    const double u = k->second.compute() * std::max(1.0, r);
    const double distance = std::abs(std::log(b)) + std::abs(std::log(l));
    if (!found || distance < best_distance - 1e-12 || (distance <= best_distance + 1e-12 && u > bound)) {
      best_distance = distance;
      bound = u;
      found = true;
    }
  }
  return std::clamp(bound, kMinCompute, 1.0);
}

std::optional<ComputeModel::Stats> ComputeModel::stats(const std::string& kind) const {
  const auto it = kinds_.find(kind);
  if (it == kinds_.end()) return std::nullopt;
  return it->second;
}

}  // namespace memfit::sched
