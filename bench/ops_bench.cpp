// memfit-bench-ops: memfit's ops against the stock LibTorch ops, and transformer blocks
// in four memory modes, side by side in one run. Prints a table, or with --json one
// JSON object. See docs/PERFORMANCE.md for the command lines and recorded results.
//
//   memfit-bench-ops [--json] [--reps N] [--threads N] [--quick] [--only ops|blocks]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "blocks.h"
#include "memory_meter.h"
#include "ops.h"

namespace {

using memfit::bench::Arch;
using memfit::bench::Block;
using memfit::bench::BlockShape;
using memfit::bench::Mode;
using memfit::ops::LinearWeights;
using memfit::ops::MemoryMeter;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

struct Options {
  bool json = false;
  bool quick = false;
  int reps = 7;
  int threads = 2;
  std::string only;
};

int64_t current() { return MemoryMeter::stats().current_bytes; }

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0.0 : (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
}

// A function of the op's inputs; inputs are fresh non-leaf copies each call.
using OpFn = std::function<at::Tensor(const std::vector<at::Tensor>&)>;

struct Measurement {
  int64_t kept = 0;        // bytes the graph keeps after forward, beyond the output
  int64_t peak = 0;        // peak over forward + backward, above the start
  std::vector<double> ms;  // forward + backward wall time per repetition
};

// One forward + backward; records kept and peak bytes and returns the time in ms.
double run_once(const std::vector<at::Tensor>& leaves, const OpFn& fn, const at::Tensor& dy,
                Measurement* m) {
  const int64_t before = current();
  MemoryMeter::reset_peak();
  const auto t0 = Clock::now();
  at::Tensor out;
  {
    std::vector<at::Tensor> xs;
    for (const auto& l : leaves) xs.push_back(l.requires_grad() ? l.clone() : l);
    out = fn(xs);
  }
  m->kept = current() - before - static_cast<int64_t>(out.nbytes());
  out.backward(dy);
  out.reset();
  const auto t1 = Clock::now();
  m->peak = MemoryMeter::stats().peak_bytes - before;
  return std::chrono::duration<double, std::milli>(t1 - t0).count();
}

void clear_grads(const std::vector<at::Tensor>& ts) {
  for (const auto& t : ts) {
    if (t.defined() && t.grad().defined()) const_cast<at::Tensor&>(t).mutable_grad() = at::Tensor();
  }
}

// Runs a and b alternately (a, b, b, a, ...) so drift hits both alike.
std::pair<Measurement, Measurement> compare(const std::vector<at::Tensor>& leaves,
                                            const std::vector<at::Tensor>& params, const OpFn& a,
                                            const OpFn& b, int reps) {
  Measurement ma, mb;
  at::Tensor dy;
  {
    at::NoGradGuard ng;
    std::vector<at::Tensor> xs(leaves.begin(), leaves.end());
    dy = at::randn(a(xs).sizes());
  }
  for (int r = -1; r < reps; ++r) {  // r = -1: warm-up
    for (int side = 0; side < 2; ++side) {
      const bool first = (r % 2 == 0) == (side == 0);
      Measurement& m = first ? ma : mb;
      clear_grads(leaves);
      clear_grads(params);
      const double t = run_once(leaves, first ? a : b, dy, &m);
      if (r >= 0) m.ms.push_back(t);
    }
  }
  clear_grads(leaves);
  clear_grads(params);
  return {ma, mb};
}

std::string fmt_bytes(int64_t b) {
  char buf[32];
  const double v = static_cast<double>(b);
  if (std::llabs(b) >= (int64_t{1} << 20)) std::snprintf(buf, sizeof buf, "%.2f MiB", v / (1 << 20));
  else if (std::llabs(b) >= 1024) std::snprintf(buf, sizeof buf, "%.1f KiB", v / 1024);
  else std::snprintf(buf, sizeof buf, "%lld B", static_cast<long long>(b));
  return buf;
}

std::string shape_str(at::IntArrayRef s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) out += (i ? "x" : "") + std::to_string(s[i]);
  return out;
}

json op_rows(const Options& o) {
  const int64_t T = o.quick ? 64 : 8 * 197;     // ViT-B/16 tokens, batch 8
  const int64_t Tl = o.quick ? 32 : 256;        // LLaMA tokens, batch 1 x 256
  const int64_t d = o.quick ? 64 : 768, I = o.quick ? 256 : 3072;
  const int64_t dl = o.quick ? 64 : 4096, Il = o.quick ? 172 : 11008;
  const double scale = 2.0;
  auto leaf = [](std::vector<int64_t> s, double mul = 1.0) { return (at::randn(s) * mul).requires_grad_(true); };
  auto lora = [&](int64_t in, int64_t out) {
    return LinearWeights::lora(at::randn({out, in}) / std::sqrt(double(in)), at::Tensor(),
                               (at::randn({8, in}) * 0.05).requires_grad_(true),
                               (at::randn({out, 8}) * 0.05).requires_grad_(true), scale);
  };
  auto stock_lora = [scale](const at::Tensor& x, const LinearWeights& w) {
    return at::linear(x, w.weight, w.bias) + scale * at::linear(at::linear(x, w.lora_a), w.lora_b);
  };
  auto params = [](const LinearWeights& w) { return std::vector<at::Tensor>{w.lora_a, w.lora_b}; };

  struct Op {
    std::string name, stock_name;
    std::vector<at::Tensor> leaves, params;
    OpFn stock, memfit;
  };
  std::vector<Op> ops;
  ops.push_back({"regelu2", "gelu", {leaf({T, I}, 2.0)}, {},
                 [](const auto& x) { return at::gelu(x[0]); },
                 [](const auto& x) { return memfit::ops::regelu2(x[0]); }});
  ops.push_back({"resilu2", "silu", {leaf({Tl, Il}, 2.0)}, {},
                 [](const auto& x) { return at::silu(x[0]); },
                 [](const auto& x) { return memfit::ops::resilu2(x[0]); }});
  ops.push_back({"ms_layer_norm", "layer_norm", {leaf({T, d})}, {},
                 [d](const auto& x) { return at::layer_norm(x[0], {d}); },
                 [](const auto& x) { return memfit::ops::ms_layer_norm(x[0], 1e-5); }});
  ops.push_back({"ms_rms_norm", "rms_norm composite", {leaf({Tl, dl})}, {},
                 [](const auto& x) { return x[0] * at::rsqrt(x[0].pow(2).mean(-1, true) + 1e-6); },
                 [](const auto& x) { return memfit::ops::ms_rms_norm(x[0], 1e-6); }});
  {
    const LinearWeights w = lora(d, d);
    ops.push_back({"linear (LoRA)", "linear + LoRA composite", {leaf({T, d})}, params(w),
                   [=](const auto& x) { return stock_lora(x[0], w); },
                   [=](const auto& x) { return memfit::ops::linear(x[0], w, true); }});
  }
  {
    const LinearWeights w = lora(I, d);
    ops.push_back({"act_linear (GELU, fc2+LoRA)", "gelu + linear + LoRA", {leaf({T, I}, 2.0)}, params(w),
                   [=](const auto& x) { return stock_lora(at::gelu(x[0]), w); },
                   [=](const auto& x) { return memfit::ops::act_linear(memfit::ops::MlpAct::kGELU, x[0], w, true); }});
  }
  {
    const LinearWeights w = lora(Il, dl);
    ops.push_back({"swiglu_linear (down+LoRA)", "silu(g)*u + linear + LoRA",
                   {leaf({Tl, Il}, 2.0), leaf({Tl, Il})}, params(w),
                   [=](const auto& x) { return stock_lora(at::silu(x[0]) * x[1], w); },
                   [=](const auto& x) { return memfit::ops::swiglu_linear(x[0], x[1], w, true); }});
  }
  ops.push_back({"dropout (1-bit mask)", "dropout", {leaf({T, I})}, {},
                 [](const auto& x) { return at::dropout(x[0], 0.1, true); },
                 [](const auto& x) { return memfit::ops::dropout(x[0], 0.1, true); }});
  {
    const int64_t B = o.quick ? 2 : 8, S = o.quick ? 33 : 197, H = o.quick ? 4 : 12, D = 64 / (o.quick ? 4 : 1);
    ops.push_back({"attention (ViT)", "softmax attention composite",
                   {leaf({B, S, H, D}), leaf({B, S, H, D}), leaf({B, S, H, D})}, {},
                   [](const auto& x) { return memfit::bench::stock_attention(x[0], x[1], x[2], false); },
                   [](const auto& x) { return memfit::ops::attention(x[0], x[1], x[2]).flatten(2); }});
  }
  {
    const int64_t S = o.quick ? 32 : 256, H = o.quick ? 4 : 32, D = o.quick ? 16 : 128;
    ops.push_back({"attention (causal, LLaMA)", "softmax attention composite",
                   {leaf({1, S, H, D}), leaf({1, S, H, D}), leaf({1, S, H, D})}, {},
                   [](const auto& x) { return memfit::bench::stock_attention(x[0], x[1], x[2], true); },
                   [](const auto& x) {
                     memfit::ops::AttentionOptions a;
                     a.causal = true;
                     return memfit::ops::attention(x[0], x[1], x[2], a).flatten(2);
                   }});
  }

  json rows = json::array();
  for (const Op& op : ops) {
    auto [stock, mine] = compare(op.leaves, op.params, op.stock, op.memfit, o.reps);
    const double ts = median(stock.ms), tm = median(mine.ms);
    json shapes = json::array();
    for (const auto& l : op.leaves) shapes.push_back(shape_str(l.sizes()));
    rows.push_back({{"op", op.name}, {"stock_op", op.stock_name}, {"shapes", shapes},
                    {"stock_ms", ts}, {"memfit_ms", tm}, {"time_ratio", tm / ts},
                    {"stock_kept_bytes", stock.kept}, {"memfit_kept_bytes", mine.kept},
                    {"stock_peak_bytes", stock.peak}, {"memfit_peak_bytes", mine.peak}});
  }
  return rows;
}

json block_rows(const Options& o) {
  std::vector<BlockShape> shapes;
  if (o.quick) {
    BlockShape v = memfit::bench::vit_b16_block(2);
    v.seq = 17; v.d = 64; v.heads = v.kv_heads = 4; v.inter = 256;
    BlockShape l = memfit::bench::llama7b_block(1, 32);
    l.d = 64; l.heads = l.kv_heads = 4; l.inter = 172;
    shapes = {v, l};
  } else {
    shapes = {memfit::bench::vit_b16_block(8), memfit::bench::llama7b_block(1, 256)};
  }
  const Mode modes[] = {Mode::kExactStockAttention, Mode::kExact, Mode::kPaper, Mode::kBest};
  json rows = json::array();
  for (const BlockShape& s : shapes) {
    const Block block(s, 42);
    const at::Tensor x = at::randn({s.batch, s.seq, s.d}).requires_grad_(true);
    const at::Tensor dy = at::randn({s.batch, s.seq, s.d});
    std::vector<Measurement> ms(4);
    for (int r = -1; r < o.reps; ++r) {
      for (int i = 0; i < 4; ++i) {
        const int mi = (r % 2 == 0) ? i : 3 - i;  // alternate the order
        block.zero_grad();
        clear_grads({x});
        const double t = run_once({x}, [&](const auto& xs) { return block.forward(xs[0], modes[mi]); },
                                  dy, &ms[mi]);
        if (r >= 0) ms[mi].ms.push_back(t);
      }
    }
    block.zero_grad();
    clear_grads({x});
    const double unit = 4.0 * static_cast<double>(s.d) * static_cast<double>(s.tokens());
    const int64_t exact_kept = ms[1].kept;
    const double exact_ms = median(ms[1].ms);
    for (int i = 0; i < 4; ++i) {
      const auto expected = memfit::bench::expected_kept_bytes(s, modes[i]);
      json parts = json::array();
      for (const auto& [what, bytes] : expected.parts) parts.push_back({{"what", what}, {"bytes", bytes}});
      rows.push_back({{"block", s.arch == Arch::kViT ? "ViT-B/16" : "LLaMA-7B"},
                      {"batch", s.batch}, {"seq", s.seq}, {"d", s.d}, {"heads", s.heads},
                      {"inter", s.inter}, {"rank", s.rank},
                      {"mode", memfit::bench::mode_name(modes[i])},
                      {"kept_bytes", ms[i].kept},
                      {"kept_per_token_in_d_floats", static_cast<double>(ms[i].kept) / unit},
                      {"expected_kept_bytes", expected.total},
                      {"kept_vs_expected", static_cast<double>(ms[i].kept) / static_cast<double>(expected.total)},
                      {"kept_vs_exact", static_cast<double>(ms[i].kept) / static_cast<double>(exact_kept)},
                      {"peak_bytes", ms[i].peak},
                      {"step_ms", median(ms[i].ms)},
                      {"step_vs_exact", median(ms[i].ms) / exact_ms},
                      {"expected_parts", parts}});
    }
  }
  return rows;
}

void print_tables(const json& out) {
  if (out.contains("ops")) {
    std::printf("\nPer op, forward+backward, fp32, %d threads, median of %d runs\n",
                out["threads"].get<int>(), out["reps"].get<int>());
    std::printf("%-28s %-30s %10s %10s %7s %12s %12s\n", "memfit op", "stock op", "stock ms",
                "memfit ms", "ratio", "stock kept", "memfit kept");
    for (const auto& r : out["ops"]) {
      std::printf("%-28s %-30s %10.2f %10.2f %7.3f %12s %12s\n", r["op"].get<std::string>().c_str(),
                  r["stock_op"].get<std::string>().c_str(), r["stock_ms"].get<double>(),
                  r["memfit_ms"].get<double>(), r["time_ratio"].get<double>(),
                  fmt_bytes(r["stock_kept_bytes"]).c_str(), fmt_bytes(r["memfit_kept_bytes"]).c_str());
    }
  }
  if (out.contains("blocks")) {
    std::printf("\nTransformer blocks, LoRA r=8 on every linear, forward+backward, median of %d runs\n",
                out["reps"].get<int>());
    std::printf("%-9s %-17s %12s %9s %10s %9s %12s %10s %8s\n", "block", "mode", "kept", "d/token",
                "vs exact", "vs model", "peak", "step ms", "vs exact");
    for (const auto& r : out["blocks"]) {
      std::printf("%-9s %-17s %12s %9.3f %9.1f%% %9.4f %12s %10.1f %8.3f\n",
                  r["block"].get<std::string>().c_str(), r["mode"].get<std::string>().c_str(),
                  fmt_bytes(r["kept_bytes"]).c_str(), r["kept_per_token_in_d_floats"].get<double>(),
                  100.0 * (r["kept_vs_exact"].get<double>() - 1.0), r["kept_vs_expected"].get<double>(),
                  fmt_bytes(r["peak_bytes"]).c_str(), r["step_ms"].get<double>(),
                  r["step_vs_exact"].get<double>());
    }
    std::printf("(d/token: kept bytes / (4 * d * tokens); vs model: measured / docs/ACCOUNTING.md count)\n");
  }
}

int usage(const char* prog, const std::string& why) {
  std::fprintf(stderr, "%s: %s\nusage: %s [--json] [--reps N] [--threads N] [--quick] [--only ops|blocks]\n",
               prog, why.c_str(), prog);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&](const char* flag) -> const char* {
      if (i + 1 >= argc) return nullptr;
      (void)flag;
      return argv[++i];
    };
    if (a == "--json") o.json = true;
    else if (a == "--quick") o.quick = true;
    else if (a == "--reps" || a == "--threads") {
      const char* v = value(a.c_str());
      char* end = nullptr;
      const long n = v ? std::strtol(v, &end, 10) : 0;
      if (!v || *end != '\0' || n < 1 || n > 1000) return usage(argv[0], a + " needs an integer in 1..1000");
      (a == "--reps" ? o.reps : o.threads) = static_cast<int>(n);
    } else if (a == "--only") {
      const char* v = value("--only");
      if (!v || (std::strcmp(v, "ops") != 0 && std::strcmp(v, "blocks") != 0)) return usage(argv[0], "--only takes ops or blocks");
      o.only = v;
    } else if (a == "-h" || a == "--help") {
      usage(argv[0], "benchmark memfit's ops against stock LibTorch");
      return 0;
    } else {
      return usage(argv[0], "unknown argument '" + a + "'");
    }
  }
  MemoryMeter::install();
  at::set_num_threads(o.threads);
  at::manual_seed(0);
  json out = {{"threads", o.threads}, {"reps", o.reps}, {"quick", o.quick}, {"dtype", "float32"},
              {"torch_threads", at::get_num_threads()}};
  try {
    if (o.only.empty() || o.only == "ops") out["ops"] = op_rows(o);
    if (o.only.empty() || o.only == "blocks") out["blocks"] = block_rows(o);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "memfit-bench-ops: %s\n", e.what_without_backtrace());
    return 1;
  }
  if (o.json) std::cout << out.dump() << "\n";
  else print_tables(out);
  return 0;
}
