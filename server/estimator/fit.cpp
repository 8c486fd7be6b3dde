#include "fit.h"

#include <algorithm>
#include <iterator>

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

Input with(const Input& in, int64_t micro, int64_t accumulation, const spec::Memory& m) {
  Input t = in;
  t.job.training.micro_batch = micro;
  t.job.training.gradient_accumulation = accumulation;
  t.job.memory = m;
  return t;
}

bool same_options(const spec::Memory& a, const spec::Memory& b) {
  return a.approx_activation == b.approx_activation && a.memory_sharing_norm == b.memory_sharing_norm &&
         a.fused_mlp == b.fused_mlp && a.fused_loss == b.fused_loss && a.efficient_attention == b.efficient_attention &&
         a.checkpointing == b.checkpointing;
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

int choose_point(const std::vector<FitPoint>& points, int64_t device_bytes, bool* fits) {
  int best = -1, smallest = -1;
  auto better = [&](const FitPoint& a, const FitPoint& b) {
    if (a.checkpointing != b.checkpointing) return !a.checkpointing;  // recomputing costs speed
    if (a.micro_batch != b.micro_batch) return a.micro_batch > b.micro_batch;
    return a.level < b.level;  // the cheaper options
  };
  for (size_t i = 0; i < points.size(); ++i) {
    const FitPoint& p = points[i];
    if (p.peak_bytes <= 0) continue;  // beyond any device
    if (smallest < 0 || p.peak_bytes < points[static_cast<size_t>(smallest)].peak_bytes) smallest = static_cast<int>(i);
    if (p.peak_bytes <= device_bytes && (best < 0 || better(p, points[static_cast<size_t>(best)]))) {
      best = static_cast<int>(i);
    }
  }
  *fits = best >= 0;
  return best >= 0 ? best : smallest;
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
  // Every point that keeps the global batch: each micro-batch dividing it, at each level.
  // Memory need not shrink with the micro-batch or grow with fewer options (chunked
  // kernels, recomputation's own buffers), so nothing is skipped by assuming it does.
  std::vector<FitPoint> points;
  std::vector<spec::Memory> options;
  std::vector<std::string> level_names;
  for (int li = 0; li < static_cast<int>(std::size(kLevels)); ++li) {
    const spec::Memory m = memory_for_level(in.job.memory, kLevels[li]);
    if (!options.empty() && same_options(m, options.back())) continue;
    options.push_back(m);
    level_names.push_back(kLevels[li]);
    for (int64_t micro : divs) {
      FitPoint p;
      p.level = static_cast<int>(options.size()) - 1;
      p.micro_batch = micro;
      p.checkpointing = m.checkpointing;
      try {
        p.peak_bytes = estimate(with(in, micro, global / micro, m)).peak_bytes;
      } catch (const EstimateError&) {
        p.peak_bytes = 0;  // beyond any device
      }
      points.push_back(p);
    }
  }
  plan.points_searched = static_cast<int64_t>(points.size());
  for (size_t li = 0; li < options.size(); ++li) {
    int64_t largest = 0, need = 0;
    for (const FitPoint& p : points) {
      if (p.level != static_cast<int>(li) || p.peak_bytes <= 0) continue;
      if (p.peak_bytes <= device_bytes) largest = std::max(largest, p.micro_batch);
      if (need == 0 || p.peak_bytes < need) need = p.peak_bytes;
    }
    plan.reasons.push_back(level_names[li] + " (" + describe(options[li]) + "): " +
                           (largest > 0 ? "micro-batch " + std::to_string(largest) + " fits"
                                        : "nothing fits; its smallest point needs " + format_size(need)));
  }
  bool fits = false;
  const int chosen = choose_point(points, device_bytes, &fits);
  if (chosen < 0) throw EstimateError("no micro-batch of this job can be estimated on any device");
  const FitPoint& c = points[static_cast<size_t>(chosen)];
  plan.micro_batch = c.micro_batch;
  plan.gradient_accumulation = global / c.micro_batch;
  plan.memory = options[static_cast<size_t>(c.level)];
  plan.estimate = estimate(with(in, plan.micro_batch, plan.gradient_accumulation, plan.memory));
  const std::string point = "micro-batch " + std::to_string(plan.micro_batch) + " x " +
                            std::to_string(plan.gradient_accumulation) + " accumulation";
  if (fits) {
    plan.fits = true;
    plan.level = level_names[static_cast<size_t>(c.level)];
    std::string why = "chose " + plan.level + ": " + point + " keeps the global batch of " + std::to_string(global) +
                      " and needs " + format_size(plan.estimate.peak_bytes) + " (" + std::to_string(points.size()) +
                      " points searched)";
    if (plan.level == "as-requested") {
      why += "; the job's own options suffice";
    } else if (plan.memory.checkpointing) {
      why += "; nothing fits without recomputing each block in backward (about a third more compute)";
    } else {
      why += "; cheaper levels fit a smaller micro-batch or none, and these options cost no speed";
    }
    plan.reasons.push_back(why);
    return plan;
  }
  plan.level = "none";
  plan.smallest_bytes = plan.estimate.peak_bytes;
  plan.reasons.push_back("nothing fits in " + format_size(device_bytes) + ": the smallest of " +
                         std::to_string(points.size()) + " points (" + point + ", " +
                         describe(plan.memory) + ") needs " + format_size(plan.smallest_bytes));
  return plan;
}

}  // namespace memfit::estimator
