// memfit-bench-train: whole training steps (forward, backward, AdamW) of memfit's
// models at small realistic shapes, in every memory mode, with LoRA and with full
// fine-tuning. Reports the median step time, the peak memory of a step above what was
// allocated before it (weights, optimizer state), and the activation bytes the forward
// pass left for backward. Synthetic inputs (random tokens / pixels), random weights.
//
//   memfit-bench-train [--json] [--reps N] [--threads N] [--quick] [--only ARCH]
//                      [--mode NAME] [--method lora|full]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "memory_meter.h"
#include "model_config.h"
#include "model/model.h"
#include "spec.h"
#include "train/optimizer.h"

namespace {

using json = nlohmann::json;
using memfit::ops::MemoryMeter;
namespace spec = memfit::spec;

struct Arch {
  std::string name;
  spec::Architecture arch;
  spec::Task task;
  json config;
  int64_t batch, seq;
};

struct Mode {
  std::string name;
  spec::Memory memory;
};

std::vector<Arch> archs(bool quick) {
  const int64_t L = quick ? 1 : 4;
  return {
      {"gpt2", spec::Architecture::kGPT2, spec::Task::kCausalLM,
       {{"vocab_size", quick ? 1000 : 50257}, {"n_embd", quick ? 64 : 384}, {"n_layer", L}, {"n_head", quick ? 4 : 6},
        {"n_positions", 1024}, {"activation_function", "gelu_new"}},
       quick ? 2 : 4, quick ? 32 : 256},
      {"llama", spec::Architecture::kLlama, spec::Task::kCausalLM,
       {{"vocab_size", quick ? 1000 : 32000}, {"hidden_size", quick ? 64 : 512}, {"intermediate_size", quick ? 172 : 1376},
        {"num_hidden_layers", L}, {"num_attention_heads", quick ? 4 : 8}, {"num_key_value_heads", quick ? 2 : 4},
        {"max_position_embeddings", 2048}, {"tie_word_embeddings", false}, {"hidden_act", "silu"}},
       quick ? 2 : 2, quick ? 32 : 256},
      {"vit", spec::Architecture::kViT, spec::Task::kImageClassification,
       {{"hidden_size", quick ? 64 : 192}, {"num_hidden_layers", quick ? 1 : 6}, {"num_attention_heads", quick ? 4 : 3},
        {"intermediate_size", quick ? 128 : 768}, {"image_size", quick ? 32 : 224}, {"patch_size", 16},
        {"num_channels", 3}, {"hidden_act", "gelu"}, {"num_labels", 10}},
       quick ? 2 : 16, 0},
      {"roberta", spec::Architecture::kRoberta, spec::Task::kSequenceClassification,
       {{"vocab_size", quick ? 1000 : 50265}, {"hidden_size", quick ? 64 : 384}, {"num_hidden_layers", L},
        {"num_attention_heads", quick ? 4 : 6}, {"intermediate_size", quick ? 128 : 1536},
        {"max_position_embeddings", 514}, {"type_vocab_size", 1}, {"layer_norm_eps", 1e-5},
        {"hidden_act", "gelu"}, {"num_labels", 2}, {"pad_token_id", 1}},
       quick ? 2 : 16, quick ? 32 : 128},
  };
}

std::vector<Mode> modes(const Arch& a) {
  std::vector<Mode> m;
  auto add = [&](const std::string& name, bool approx, bool ms, bool fused, bool ckpt, const std::string& preset,
                 bool fused_loss = false) {
    Mode x;
    x.name = name;
    x.memory.approx_activation = approx;
    x.memory.memory_sharing_norm = ms;
    x.memory.fused_mlp = fused;
    x.memory.checkpointing = ckpt;
    x.memory.efficient_attention = true;
    x.memory.preset = preset;
    x.memory.fused_loss = fused_loss || preset == "memfit_best";
    m.push_back(x);
  };
  add("exact", false, false, false, false, "");
  add("approx", true, false, false, false, "");
  add("memory_sharing", false, true, false, false, "");
  add("approx+ms", true, true, false, false, "");
  if (a.arch == spec::Architecture::kLlama) add("approx+ms+fused_swiglu", true, true, true, false, "");
  if (a.task == spec::Task::kCausalLM) add("fused_loss", false, false, false, false, "", true);
  add("memfit_best", true, true, true, false, "memfit_best");
  add("checkpointing", false, false, false, true, "");
  return m;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

struct Row {
  std::string arch, method, mode;
  double step_ms = 0;
  int64_t peak = 0, activation = 0, trainable = 0;
};

Row measure(const Arch& a, const Mode& mode, spec::Method method, int reps, const std::string& cfg_path) {
  spec::Job job;
  job.name = a.name;
  job.architecture = a.arch;
  job.task = a.task;
  job.config_path = cfg_path;
  job.method = method;
  job.lora.rank = 8;
  job.lora.alpha = 16;
  job.memory = mode.memory;
  job.init_seed = 1;
  const memfit::model::ModelConfig cfg = memfit::model::load_config(cfg_path, a.arch);
  auto m = memfit::model::Model::create(job, cfg);
  m->prepare(at::Device(at::kCPU));
  memfit::train::AdamW opt(m->trainable_state(), 0.01);
  at::manual_seed(0);
  memfit::model::Batch b;
  if (a.arch == spec::Architecture::kViT) {
    b.pixels = at::randn({a.batch, cfg.channels, cfg.image_size, cfg.image_size});
    b.labels = at::randint(cfg.num_labels, {a.batch}, at::kLong);
  } else {
    b.input_ids = at::randint(2, cfg.vocab_size, {a.batch, a.seq}, at::kLong);
    b.labels = a.task == spec::Task::kCausalLM ? b.input_ids : at::randint(cfg.num_labels, {a.batch}, at::kLong);
  }
  Row r;
  r.arch = a.name;
  r.method = spec::name_of(method);
  r.mode = mode.name;
  r.trainable = m->trainable_count();
  std::vector<double> times;
  for (int i = -1; i < reps; ++i) {
    const int64_t before = MemoryMeter::stats().current_bytes;
    MemoryMeter::reset_peak();
    const auto t0 = std::chrono::steady_clock::now();
    const memfit::model::Output o = m->forward(b, true);
    const int64_t act = MemoryMeter::stats().current_bytes - before;
    o.loss.backward();
    opt.clip_grad_norm(1.0);
    opt.step(1e-4);
    opt.zero_grad();
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    if (i >= 0) {
      times.push_back(ms);
      r.peak = MemoryMeter::stats().peak_bytes - before;
      r.activation = act;
    }
  }
  r.step_ms = median(times);
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  bool as_json = false, quick = false;
  int reps = 5, threads = 2;
  std::string only, only_mode, only_method;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--json") as_json = true;
    else if (a == "--quick") quick = true;
    else if (a == "--reps" && i + 1 < argc) reps = std::max(1, std::atoi(argv[++i]));
    else if (a == "--threads" && i + 1 < argc) threads = std::max(1, std::atoi(argv[++i]));
    else if (a == "--only" && i + 1 < argc) only = argv[++i];
    else if (a == "--mode" && i + 1 < argc) only_mode = argv[++i];
    else if (a == "--method" && i + 1 < argc) only_method = argv[++i];
    else {
      std::fprintf(stderr,
                   "usage: %s [--json] [--reps N] [--threads N] [--quick] [--only gpt2|llama|vit|roberta] "
                   "[--mode NAME] [--method lora|full]\n",
                   argv[0]);
      return 2;
    }
  }
  MemoryMeter::install();
  at::set_num_threads(threads);
  const std::filesystem::path dir = std::filesystem::temp_directory_path() / "memfit-bench-train";
  std::filesystem::create_directories(dir);
  std::vector<Row> rows;
  try {
    for (const Arch& a : archs(quick)) {
      if (!only.empty() && a.name != only) continue;
      const std::string cfg = (dir / (a.name + ".json")).string();
      std::ofstream(cfg) << a.config.dump();
      for (spec::Method method : {spec::Method::kLora, spec::Method::kFull}) {
        if (!only_method.empty() && only_method != spec::name_of(method)) continue;
        for (const Mode& mode : modes(a)) {
          if (!only_mode.empty() && only_mode != mode.name) continue;
          try {
            rows.push_back(measure(a, mode, method, reps, cfg));
          } catch (const std::exception& e) {
            throw std::runtime_error(a.name + " " + spec::name_of(method) + " " + mode.name + ": " + e.what());
          }
        }
      }
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "memfit-bench-train: %s\n", e.what());
    return 1;
  }
  if (as_json) {
    json out = {{"threads", threads}, {"reps", reps}, {"quick", quick}, {"rows", json::array()}};
    for (const Row& r : rows) {
      out["rows"].push_back({{"arch", r.arch}, {"method", r.method}, {"mode", r.mode}, {"step_ms", r.step_ms},
                             {"peak_bytes", r.peak}, {"activation_bytes", r.activation},
                             {"trainable_parameters", r.trainable}});
    }
    std::printf("%s\n", out.dump().c_str());
    return 0;
  }
  std::printf("Training steps (forward, backward, AdamW), fp32, %d threads, median of %d\n", threads, reps);
  std::printf("%-8s %-5s %-24s %10s %8s %12s %8s %12s %8s\n", "model", "tune", "mode", "step ms", "vs exact",
              "peak MiB", "vs exact", "act. MiB", "vs exact");
  const Row* exact = rows.empty() ? nullptr : &rows[0];
  for (const Row& r : rows) {
    if (r.mode == "exact") exact = &r;
    std::printf("%-8s %-5s %-24s %10.1f %8.3f %12.2f %8.3f %12.2f %8.3f\n", r.arch.c_str(), r.method.c_str(),
                r.mode.c_str(), r.step_ms, r.step_ms / exact->step_ms, r.peak / 1048576.0,
                static_cast<double>(r.peak) / static_cast<double>(exact->peak), r.activation / 1048576.0,
                static_cast<double>(r.activation) / static_cast<double>(exact->activation));
  }
  return 0;
}
