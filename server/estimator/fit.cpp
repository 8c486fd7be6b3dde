#include "fit.h"

#include <algorithm>

namespace memfit::estimator {
namespace {

const char* kLevels[] = {"as-requested", "exact-free", "approx", "checkpointing"};

std::string describe(const spec::Memory& m) {
  std::string s;
  auto add = [&](bool on, const char* name) {
    if (on) s += (s.empty() ? "" : ", ") + std::string(name);
  };
  add(m.approx_activation, "approximate activations");
  add(m.memory_sharing_norm, "memory-sharing norms");
  add(m.fused_mlp || m.preset == "memfit_best", "fused MLP tails");
  add(m.fused_loss, "fused LM loss");
  add(m.efficient_attention, "memfit attention");
  add(m.checkpointing, "activation checkpointing");
  return s.empty() ? "no memory options" : s;
}

std::vector<int64_t> divisors_desc(int64_t g) {
  std::vector<int64_t> d;
  for (int64_t i = 1; i * i <= g; ++i) {
    if (g % i == 0) {
      d.push_back(i);
      if (i != g / i) d.push_back(g / i);
    }
  }
  std::sort(d.rbegin(), d.rend());
  return d;
}

struct Trial {
  bool ok = false;
  int64_t micro = 0;
  Estimate est;
};

Input with(const Input& in, int64_t micro, int64_t accumulation, const spec::Memory& m) {
  Input t = in;
  t.job.training.micro_batch = micro;
  t.job.training.gradient_accumulation = accumulation;
  t.job.memory = m;
  return t;
}

// The largest micro-batch (a divisor of the global batch) whose estimate fits.
Trial largest_fitting(const Input& in, const std::vector<int64_t>& divs, int64_t global, const spec::Memory& m,
                      int64_t device_bytes) {
  auto fits = [&](size_t i, Estimate* out) {
    try {
      Estimate e = estimate(with(in, divs[i], global / divs[i], m));
      const bool ok = e.peak_bytes <= device_bytes;
      if (out) *out = std::move(e);
      return ok;
    } catch (const EstimateError&) {
      return false;  // beyond any device
    }
  };
  // divs is descending; memory grows with the micro-batch, so fitting is a suffix.
  size_t lo = 0, hi = divs.size();  // answer in [lo, hi); hi = none
  while (lo < hi) {
    const size_t mid = lo + (hi - lo) / 2;
    if (fits(mid, nullptr)) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  Trial t;
  if (lo < divs.size()) {
    t.ok = fits(lo, &t.est);
    t.micro = divs[lo];
  }
  return t;
}

}  // namespace

spec::Memory memory_for_level(const spec::Memory& m, const std::string& level) {
  spec::Memory r = m;
  if (level == "as-requested") return r;
  r.memory_sharing_norm = true;
  r.fused_mlp = true;
  r.fused_loss = true;
  r.efficient_attention = true;
  if (level == "exact-free") return r;
  r.approx_activation = true;
  if (level == "approx") return r;
  r.checkpointing = true;
  if (level == "checkpointing") return r;
  throw EstimateError("fit level: unknown '" + level + "'");
}

FitPlan fit(const Input& in, int64_t device_bytes) {
  if (device_bytes <= 0) throw EstimateError("device memory: must be positive, got " + std::to_string(device_bytes));
  const Estimate requested = estimate(in);  // validates the job; its errors name the field
  FitPlan plan;
  plan.device_bytes = device_bytes;
  const int64_t global = in.job.training.micro_batch * in.job.training.gradient_accumulation;
  const std::vector<int64_t> divs = divisors_desc(global);
  plan.reasons.push_back("as requested (micro-batch " + std::to_string(in.job.training.micro_batch) + " x " +
                         std::to_string(in.job.training.gradient_accumulation) + " accumulation, " +
                         describe(in.job.memory) + "): needs " + format_size(requested.peak_bytes) + " of " +
                         format_size(device_bytes));
  Trial best;
  std::string best_level;
  spec::Memory prev;
  bool have_prev = false;
  for (const char* level : kLevels) {
    const spec::Memory m = memory_for_level(in.job.memory, level);
    const bool same = have_prev && m.approx_activation == prev.approx_activation &&
                      m.memory_sharing_norm == prev.memory_sharing_norm && m.fused_mlp == prev.fused_mlp &&
                      m.fused_loss == prev.fused_loss && m.efficient_attention == prev.efficient_attention &&
                      m.checkpointing == prev.checkpointing;
    prev = m;
    have_prev = true;
    if (same) continue;
    const bool ckpt_level = std::string(level) == "checkpointing";
    if (ckpt_level && best.ok) break;  // checkpointing costs speed: only when nothing else fits
    const Trial t = largest_fitting(in, divs, global, m, device_bytes);
    if (t.ok) {
      plan.reasons.push_back(std::string(level) + " (" + describe(m) + "): micro-batch " + std::to_string(t.micro) +
                             " fits in " + format_size(t.est.peak_bytes));
    } else {
      plan.reasons.push_back(std::string(level) + " (" + describe(m) + "): not even micro-batch 1 fits");
    }
    if (t.ok && (!best.ok || t.micro > best.micro)) {
      best = t;
      best_level = level;
      plan.memory = m;
    }
  }
  if (best.ok) {
    plan.fits = true;
    plan.level = best_level;
    plan.micro_batch = best.micro;
    plan.gradient_accumulation = global / best.micro;
    plan.estimate = best.est;
    std::string why = "chose " + best_level + ": micro-batch " + std::to_string(best.micro) + " x " +
                      std::to_string(plan.gradient_accumulation) + " accumulation keeps the global batch of " +
                      std::to_string(global) + " and needs " + format_size(best.est.peak_bytes);
    if (best_level == "as-requested") {
      why += "; the job's own options suffice";
    } else if (best_level == "checkpointing") {
      why += "; nothing fits without recomputing each block in backward (about a third more compute)";
    } else {
      why += "; cheaper levels fit a smaller micro-batch or none, and these options cost no speed";
    }
    plan.reasons.push_back(why);
    return plan;
  }
  const spec::Memory all = memory_for_level(in.job.memory, "checkpointing");
  plan.estimate = estimate(with(in, 1, global, all));
  plan.smallest_bytes = plan.estimate.peak_bytes;
  plan.memory = all;
  plan.level = "none";
  plan.reasons.push_back("nothing fits in " + format_size(device_bytes) + ": the smallest plan (micro-batch 1, " +
                         describe(all) + ") needs " + format_size(plan.smallest_bytes));
  return plan;
}

}  // namespace memfit::estimator
