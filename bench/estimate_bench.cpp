// memfit-bench-estimate: the estimator at real sizes, and how long it takes.
//
//   build/bin/memfit-bench-estimate            # tables for docs/PERFORMANCE.md
//   build/bin/memfit-bench-estimate --reps 200
//
// For GPT-2 124M, ViT-B/16, RoBERTa-base and LLaMA-7B at the paper's settings (LoRA; CUDA
// device model), exact vs memfit's modes: the peak, the activations kept, one middle
// layer's kept bytes next to the activation formula of Korthikanti et al. (2022),
// s*b*h*(34 + 5*a*s/h) bytes per layer for fp16 with dropout and stored attention
// scores, and the same formula for this job's settings (no dropout, scores not stored,
// the job's dtype: 16*s*b*h*bytes). Then the median time of one estimate() and of one
// fit(). No LibTorch.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "estimator.h"
#include "reference_configs.h"
#include "fit.h"

namespace {

namespace est = memfit::estimator;
namespace ref = memfit::estimator::reference;
using memfit::spec::Architecture;

struct Model {
  const char* name;
  const char* setting;
  memfit::model::ModelConfig cfg;
  memfit::spec::Task task;
  int64_t batch, seq;
  bool bf16;
};

std::vector<Model> models() {
  std::vector<Model> m;
  {
    auto c = ref::gpt2(768, 12, 12);
    m.push_back({"GPT-2 124M", "causal LM, batch 8 x 1024 tokens, fp32", c, memfit::spec::Task::kCausalLM, 8, 1024, false});
  }
  {
    auto c = ref::vit(768, 12, 12);
    m.push_back({"ViT-B/16", "CIFAR-100, batch 64, 224x224, fp32", c, memfit::spec::Task::kImageClassification, 64, 197,
                 false});
  }
  {
    auto c = ref::roberta(768, 12, 12);
    m.push_back({"RoBERTa-base", "GLUE, batch 32 x 128 tokens, fp32", c, memfit::spec::Task::kSequenceClassification, 32,
                 128, false});
  }
  {
    auto c = ref::llama(4096, 32, 32, 32, 11008);
    m.push_back({"LLaMA-7B", "Alpaca, batch 4 x 512 tokens, bf16", c, memfit::spec::Task::kCausalLM, 4, 512, true});
  }
  return m;
}

est::Input input(const Model& m, const char* mode) {
  est::Input in;
  in.config = m.cfg;
  in.job.architecture = m.cfg.arch;
  in.job.task = m.task;
  in.job.format = m.cfg.arch == Architecture::kViT ? memfit::spec::DataFormat::kIdx
                  : m.task == memfit::spec::Task::kCausalLM ? memfit::spec::DataFormat::kText
                                                            : memfit::spec::DataFormat::kJsonlClassification;
  in.job.method = memfit::spec::Method::kLora;
  in.job.lora.rank = 8;
  in.job.training.micro_batch = m.batch;
  in.job.training.sequence_length = m.seq;
  in.job.training.dtype = m.bf16 ? memfit::spec::DType::kBFloat16 : memfit::spec::DType::kFloat32;
  const std::string md = mode;
  if (md == "paper" || md == "memfit_best") {
    in.job.memory.approx_activation = true;
    in.job.memory.memory_sharing_norm = true;
  }
  if (md == "memfit_best") {
    in.job.memory.preset = "memfit_best";
    in.job.memory.fused_loss = true;
  }
  in.device = est::DeviceModel::cuda();
  return in;
}

double gib(int64_t b) { return static_cast<double>(b) / (1 << 30); }
double mib(int64_t b) { return static_cast<double>(b) / (1 << 20); }

int64_t layer_bytes(const est::Estimate& e, const char* where) {
  for (const auto& L : e.activations) {
    if (L.where == where) return L.bytes;
  }
  return 0;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 100;
  for (int i = 1; i < argc; ++i) {
    if (!std::strcmp(argv[i], "--reps") && i + 1 < argc) {
      reps = std::max(1, std::atoi(argv[++i]));
    } else {
      std::fprintf(stderr, "usage: memfit-bench-estimate [--reps N]\n");
      return 2;
    }
  }
  const char* modes[] = {"exact", "paper", "memfit_best"};
  std::printf("## Real sizes (LoRA r = 8, CUDA device model)\n\n");
  std::printf("| model | setting | mode | peak GiB | activations GiB | vs exact | layer 1 MiB | per token, units of d | "
              "Korthikanti fp16 MiB | Korthikanti, this job MiB |\n|---|---|---|---|---|---|---|---|---|---|\n");
  for (const Model& m : models()) {
    int64_t exact_act = 0;
    for (const char* mode : modes) {
      const est::Estimate e = est::estimate(input(m, mode));
      if (!std::strcmp(mode, "exact")) exact_act = e.activation_bytes;
      const int64_t s = m.seq, b = m.batch, h = m.cfg.hidden, a = m.cfg.heads, es = m.bf16 ? 2 : 4;
      const int64_t layer = layer_bytes(e, "layer 1");
      const double units = static_cast<double>(layer) / static_cast<double>(s * b * h * es);
      const bool standard = m.cfg.arch != Architecture::kLlama;  // the formula's GELU MLP block
      char k1[32] = "n/a", k2[32] = "n/a";
      if (standard && !std::strcmp(mode, "exact")) {
        std::snprintf(k1, sizeof k1, "%.1f", mib(s * b * h * 34 + 5 * a * s * s * b));
        std::snprintf(k2, sizeof k2, "%.1f", mib(16 * s * b * h * es));
      }
      std::printf("| %s | %s | %s | %.2f | %.3f | %+.1f%% | %.1f | %.3f | %s | %s |\n", m.name, m.setting, mode,
                  gib(e.peak_bytes), gib(e.activation_bytes),
                  100.0 * (static_cast<double>(e.activation_bytes) / static_cast<double>(exact_act) - 1.0), mib(layer),
                  units, k1, k2);
    }
  }
  // Where an exact layer's bytes go, in the categories of the paper's breakdown.
  std::printf("\n## Exact mode, one layer, by op\n\n| model | op | MiB | share |\n|---|---|---|---|\n");
  for (const Model& m : models()) {
    const est::Estimate e = est::estimate(input(m, "exact"));
    for (const auto& L : e.activations) {
      if (L.where != "layer 1") continue;
      for (const auto& o : L.ops) {
        std::printf("| %s | %s | %.2f | %.1f%% |\n", m.name, o.name.c_str(), mib(o.bytes),
                    100.0 * static_cast<double>(o.bytes) / static_cast<double>(L.bytes));
      }
    }
  }
  std::printf("\n## Time per call (median of %d)\n\n| model | estimate() ms | fit(40 GiB) ms | fit: micro-batch x accumulation, level |\n"
              "|---|---|---|---|\n", reps);
  for (const Model& m : models()) {
    est::Input in = input(m, "exact");
    in.job.training.gradient_accumulation = 4;
    std::vector<double> t1, t2;
    for (int r = 0; r < reps; ++r) {
      const auto a = std::chrono::steady_clock::now();
      const est::Estimate e = est::estimate(in);
      const auto b = std::chrono::steady_clock::now();
      if (e.peak_bytes <= 0) return 1;
      t1.push_back(std::chrono::duration<double, std::milli>(b - a).count());
    }
    est::FitPlan plan;
    for (int r = 0; r < std::max(1, reps / 10); ++r) {
      const auto a = std::chrono::steady_clock::now();
      plan = est::fit(in, int64_t{40} << 30);
      const auto b = std::chrono::steady_clock::now();
      t2.push_back(std::chrono::duration<double, std::milli>(b - a).count());
    }
    std::printf("| %s | %.3f | %.2f | %s |\n", m.name, median(t1), median(t2),
                plan.fits ? (std::to_string(plan.micro_batch) + " x " + std::to_string(plan.gradient_accumulation) + ", " +
                             plan.level)
                                .c_str()
                          : ("none; needs " + est::format_size(plan.smallest_bytes)).c_str());
  }
  return 0;
}
