#include "optimizer.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <vector>

namespace memfit::train {

AdamW::AdamW(std::vector<std::pair<std::string, at::Tensor>> params, double weight_decay, double beta1,
             double beta2, double eps)
    : wd_(weight_decay), b1_(beta1), b2_(beta2), eps_(eps) {
  for (auto& [name, p] : params) {
    Slot s;
    s.name = name;
    s.param = p;
    s.m = at::zeros(p.sizes(), p.options().dtype(at::kFloat));
    s.v = at::zeros(p.sizes(), p.options().dtype(at::kFloat));
    if (p.scalar_type() != at::kFloat) s.master = p.detach().to(at::kFloat);
    s.decay = p.dim() >= 2;  // no decay for biases and norm scales
    slots_.push_back(std::move(s));
  }
}

void AdamW::step(double lr) {
  at::NoGradGuard ng;
  ++t_;
  const double bc1 = 1.0 - std::pow(b1_, static_cast<double>(t_));
  const double bc2 = 1.0 - std::pow(b2_, static_cast<double>(t_));
  for (Slot& s : slots_) {
    const at::Tensor& g0 = s.param.grad();
    if (!g0.defined()) continue;
    const at::Tensor g = g0.to(at::kFloat);
    at::Tensor p = s.master.defined() ? s.master : s.param;
    // Same order of operations as torch.optim.AdamW (single-tensor path).
    if (s.decay && wd_ != 0.0) p.mul_(1.0 - lr * wd_);
    s.m.mul_(b1_).add_(g, 1.0 - b1_);
    s.v.mul_(b2_).addcmul_(g, g, 1.0 - b2_);
    const at::Tensor denom = (s.v.sqrt() / std::sqrt(bc2)).add_(eps_);
    p.addcdiv_(s.m, denom, -lr / bc1);
    if (s.master.defined()) s.param.copy_(s.master);
  }
}

void AdamW::zero_grad() {
  for (Slot& s : slots_) {
    if (s.param.grad().defined()) s.param.mutable_grad() = at::Tensor();
  }
}

double sum_of_squares(const at::Tensor& g) {
  if (g.device().is_cpu() && g.is_contiguous() &&
      (g.scalar_type() == at::kFloat || g.scalar_type() == at::kBFloat16 || g.scalar_type() == at::kHalf ||
       g.scalar_type() == at::kDouble)) {
    // Read in place and summed in double, chunk by chunk; the chunks' sums are added in
    // order, so the result does not depend on the thread count.
    constexpr int64_t kChunk = int64_t{1} << 15;
    const int64_t n = g.numel();
    std::vector<double> part(static_cast<size_t>((n + kChunk - 1) / kChunk), 0.0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "sum_of_squares", [&] {
      const scalar_t* p = g.data_ptr<scalar_t>();
      at::parallel_for(0, static_cast<int64_t>(part.size()), 1, [&](int64_t b, int64_t e) {
        for (int64_t c = b; c < e; ++c) {
          double acc[4] = {0.0, 0.0, 0.0, 0.0};
          const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
          int64_t i = lo;
          for (; i + 4 <= hi; i += 4) {
            for (int k = 0; k < 4; ++k) {
              const double v = static_cast<double>(p[i + k]);
              acc[k] += v * v;
            }
          }
          for (; i < hi; ++i) acc[0] += static_cast<double>(p[i]) * static_cast<double>(p[i]);
          part[static_cast<size_t>(c)] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
        }
      });
    });
    double sq = 0.0;
    for (const double v : part) sq += v;
    return sq;
  }
  // CUDA (and the rare strided gradient): the device's own reduction, a tree in fp32
  // (relative error about 1e-7 at any size), squared in double. No fp64 copy either way.
  const double n = g.norm().item<double>();
  return n * n;
}

double AdamW::clip_grad_norm(double max_norm) {
  at::NoGradGuard ng;
  double sq = 0.0;
  for (const Slot& s : slots_) {
    if (s.param.grad().defined()) sq += sum_of_squares(s.param.grad());
  }
  const double norm = std::sqrt(sq);
  if (max_norm > 0.0 && norm > max_norm) {
    const double scale = max_norm / (norm + 1e-6);
    for (Slot& s : slots_) {
      if (s.param.grad().defined()) s.param.mutable_grad().mul_(scale);
    }
  }
  return norm;
}

std::vector<std::pair<std::string, at::Tensor>> AdamW::state() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const Slot& s : slots_) {
    out.emplace_back("optim.m." + s.name, s.m);
    out.emplace_back("optim.v." + s.name, s.v);
    if (s.master.defined()) out.emplace_back("optim.master." + s.name, s.master);
  }
  return out;
}

void AdamW::load_state(const std::vector<std::pair<std::string, at::Tensor>>& state, int64_t steps) {
  std::map<std::string, at::Tensor> by_name(state.begin(), state.end());
  at::NoGradGuard ng;
  for (Slot& s : slots_) {
    s.m.copy_(by_name.at("optim.m." + s.name));
    s.v.copy_(by_name.at("optim.v." + s.name));
    if (s.master.defined()) s.master.copy_(by_name.at("optim.master." + s.name));
  }
  t_ = steps;
}

double learning_rate(const spec::Training& t, int64_t step, int64_t total) {
  const double base = t.learning_rate;
  if (step < t.warmup_steps) return base * static_cast<double>(step + 1) / static_cast<double>(t.warmup_steps + 1);
  const int64_t decay_steps = std::max<int64_t>(1, total - t.warmup_steps);
  const double progress = std::min(1.0, static_cast<double>(step - t.warmup_steps) / static_cast<double>(decay_steps));
  switch (t.schedule) {
    case spec::Schedule::kConstant: return base;
    case spec::Schedule::kLinear: return base * (1.0 - progress);
    case spec::Schedule::kCosine: return base * 0.5 * (1.0 + std::cos(M_PI * progress));
  }
  return base;
}

}  // namespace memfit::train
