// memfit-bench-ops: memfit's ops against the stock LibTorch ops, and transformer blocks
// in four memory modes, side by side in one run. Prints a table, or with --json one
// JSON object. See docs/PERFORMANCE.md for the command lines and recorded results.
//
//   memfit-bench-ops [--json] [--reps N] [--threads N] [--quick] [--only ops|blocks|bandwidth]
//                    [--device cpu|cuda] [--elements N]
//
// --only bandwidth: the elementwise and row ops' forward and backward passes timed apart on
// large tensors, each as bytes it must move (inputs read, outputs and masks written) per
// second, and as a fraction of a device-to-device copy's bytes (read + written) per second
// measured in the same run. Not part of the default run.
//
// Builds with LibTorch alone (no JSON library), so it also runs on GPU machines that
// have nothing but a CUDA PyTorch.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/autograd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <torch/cuda.h>
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
using Clock = std::chrono::steady_clock;

struct Options {
  bool json = false;
  at::Device device = at::Device(at::kCPU);
  bool quick = false;
  int reps = 7;
  int threads = 2;
  std::string only;
  int64_t elements = 0;  // --only bandwidth: elements per tensor (0: 64Mi on CUDA, 4Mi on CPU)
};

at::Device g_device = at::Device(at::kCPU);

int64_t current() { return MemoryMeter::stats(g_device).current_bytes; }
void sync() {
  if (g_device.is_cuda()) torch::cuda::synchronize();
}

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

struct OpRow {
  std::string op, stock_op;
  std::vector<std::string> shapes;
  double stock_ms = 0, memfit_ms = 0;
  int64_t stock_kept = 0, memfit_kept = 0, stock_peak = 0, memfit_peak = 0;
};

struct BlockRow {
  BlockShape shape;
  Mode mode = Mode::kExact;
  int64_t kept = 0, peak = 0, exact_kept = 1;
  memfit::bench::KeptBytes expected;
  double step_ms = 0, exact_ms = 1;
};

// One forward + backward; records kept and peak bytes and returns the time in ms.
double run_once(const std::vector<at::Tensor>& leaves, const OpFn& fn, const at::Tensor& dy,
                Measurement* m) {
  sync();
  const int64_t before = current();
  MemoryMeter::reset_peak(g_device);
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
  sync();
  const auto t1 = Clock::now();
  m->peak = MemoryMeter::stats(g_device).peak_bytes - before;
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
    dy = at::randn(a(xs).sizes(), at::TensorOptions().device(g_device));
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

std::vector<OpRow> op_rows(const Options& o) {
  const int64_t T = o.quick ? 64 : 8 * 197;     // ViT-B/16 tokens, batch 8
  const int64_t Tl = o.quick ? 32 : 256;        // LLaMA tokens, batch 1 x 256
  const int64_t d = o.quick ? 64 : 768, I = o.quick ? 256 : 3072;
  const int64_t dl = o.quick ? 64 : 4096, Il = o.quick ? 172 : 11008;
  const double scale = 2.0;
  const auto dev = at::TensorOptions().device(o.device);
  auto leaf = [&](std::vector<int64_t> s, double mul = 1.0) { return (at::randn(s, dev) * mul).requires_grad_(true); };
  auto lora = [&](int64_t in, int64_t out) {
    return LinearWeights::lora(at::randn({out, in}, dev) / std::sqrt(double(in)), at::Tensor(),
                               (at::randn({8, in}, dev) * 0.05).requires_grad_(true),
                               (at::randn({out, 8}, dev) * 0.05).requires_grad_(true), scale);
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

  std::vector<OpRow> rows;
  for (const Op& op : ops) {
    auto [stock, mine] = compare(op.leaves, op.params, op.stock, op.memfit, o.reps);
    OpRow r;
    r.op = op.name;
    r.stock_op = op.stock_name;
    for (const auto& l : op.leaves) r.shapes.push_back(shape_str(l.sizes()));
    r.stock_ms = median(stock.ms);
    r.memfit_ms = median(mine.ms);
    r.stock_kept = stock.kept;
    r.memfit_kept = mine.kept;
    r.stock_peak = stock.peak;
    r.memfit_peak = mine.peak;
    rows.push_back(r);
  }
  return rows;
}

std::vector<BlockRow> block_rows(const Options& o) {
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
  const auto dev = at::TensorOptions().device(o.device);
  std::vector<BlockRow> rows;
  for (const BlockShape& s : shapes) {
    const Block block(s, 42, o.device);
    const at::Tensor x = at::randn({s.batch, s.seq, s.d}, dev).requires_grad_(true);
    const at::Tensor dy = at::randn({s.batch, s.seq, s.d}, dev);
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
    for (int i = 0; i < 4; ++i) {
      BlockRow b;
      b.shape = s;
      b.mode = modes[i];
      b.kept = ms[i].kept;
      b.expected = memfit::bench::expected_kept_bytes(s, modes[i]);
      b.peak = ms[i].peak;
      b.step_ms = median(ms[i].ms);
      b.exact_kept = ms[1].kept;
      b.exact_ms = median(ms[1].ms);
      rows.push_back(b);
    }
  }
  return rows;
}

const char* block_name(const BlockShape& s) { return s.arch == Arch::kViT ? "ViT-B/16" : "LLaMA-7B"; }
double per_token_d(const BlockRow& b) {
  return static_cast<double>(b.kept) / (4.0 * static_cast<double>(b.shape.d * b.shape.tokens()));
}

void print_tables(const Options& o, const std::vector<OpRow>& ops, const std::vector<BlockRow>& blocks) {
  if (!ops.empty()) {
    std::printf("\nPer op, forward+backward, fp32, %s, %d threads, median of %d runs\n",
                o.device.str().c_str(), o.threads, o.reps);
    std::printf("%-28s %-30s %10s %10s %7s %12s %12s\n", "memfit op", "stock op", "stock ms",
                "memfit ms", "ratio", "stock kept", "memfit kept");
    for (const auto& r : ops) {
      std::printf("%-28s %-30s %10.2f %10.2f %7.3f %12s %12s\n", r.op.c_str(), r.stock_op.c_str(),
                  r.stock_ms, r.memfit_ms, r.memfit_ms / r.stock_ms, fmt_bytes(r.stock_kept).c_str(),
                  fmt_bytes(r.memfit_kept).c_str());
    }
  }
  if (!blocks.empty()) {
    std::printf("\nTransformer blocks, LoRA r=8 on every linear, forward+backward, median of %d runs\n",
                o.reps);
    std::printf("%-9s %-17s %12s %9s %10s %9s %12s %10s %8s\n", "block", "mode", "kept", "d/token",
                "vs exact", "vs model", "peak", "step ms", "vs exact");
    for (const auto& b : blocks) {
      std::printf("%-9s %-17s %12s %9.3f %9.1f%% %9.4f %12s %10.1f %8.3f\n", block_name(b.shape),
                  memfit::bench::mode_name(b.mode), fmt_bytes(b.kept).c_str(), per_token_d(b),
                  100.0 * (static_cast<double>(b.kept) / static_cast<double>(b.exact_kept) - 1.0),
                  static_cast<double>(b.kept) / static_cast<double>(b.expected.total),
                  fmt_bytes(b.peak).c_str(), b.step_ms, b.step_ms / b.exact_ms);
    }
    std::printf("(d/token: kept bytes / (4 * d * tokens); vs model: measured / docs/ACCOUNTING.md count)\n");
  }
}

// JSON without a JSON library: the values are numbers and plain ASCII names.
std::string q(const std::string& v) { return "\"" + v + "\""; }

void print_json(const Options& o, const std::vector<OpRow>& ops, const std::vector<BlockRow>& blocks) {
  std::printf("{\"device\": %s, \"threads\": %d, \"reps\": %d, \"quick\": %s, \"dtype\": \"float32\"",
              q(o.device.str()).c_str(), o.threads, o.reps, o.quick ? "true" : "false");
  if (o.only.empty() || o.only == "ops") {
    std::printf(", \"ops\": [");
    for (size_t i = 0; i < ops.size(); ++i) {
      const OpRow& r = ops[i];
      std::string shapes;
      for (size_t k = 0; k < r.shapes.size(); ++k) shapes += (k ? ", " : "") + q(r.shapes[k]);
      std::printf("%s{\"op\": %s, \"stock_op\": %s, \"shapes\": [%s], \"stock_ms\": %.4f, "
                  "\"memfit_ms\": %.4f, \"time_ratio\": %.4f, \"stock_kept_bytes\": %lld, "
                  "\"memfit_kept_bytes\": %lld, \"stock_peak_bytes\": %lld, \"memfit_peak_bytes\": %lld}",
                  i ? ", " : "", q(r.op).c_str(), q(r.stock_op).c_str(), shapes.c_str(), r.stock_ms,
                  r.memfit_ms, r.memfit_ms / r.stock_ms, static_cast<long long>(r.stock_kept),
                  static_cast<long long>(r.memfit_kept), static_cast<long long>(r.stock_peak),
                  static_cast<long long>(r.memfit_peak));
    }
    std::printf("]");
  }
  if (o.only.empty() || o.only == "blocks") {
    std::printf(", \"blocks\": [");
    for (size_t i = 0; i < blocks.size(); ++i) {
      const BlockRow& b = blocks[i];
      std::string parts;
      for (size_t k = 0; k < b.expected.parts.size(); ++k) {
        parts += std::string(k ? ", " : "") + "{\"what\": " + q(b.expected.parts[k].first) +
                 ", \"bytes\": " + std::to_string(b.expected.parts[k].second) + "}";
      }
      std::printf("%s{\"block\": %s, \"batch\": %lld, \"seq\": %lld, \"d\": %lld, \"heads\": %lld, "
                  "\"kv_heads\": %lld, \"inter\": %lld, \"rank\": %lld, \"mode\": %s, \"kept_bytes\": %lld, "
                  "\"kept_per_token_in_d_floats\": %.4f, \"expected_kept_bytes\": %lld, "
                  "\"kept_vs_expected\": %.6f, \"kept_vs_exact\": %.6f, \"peak_bytes\": %lld, "
                  "\"step_ms\": %.3f, \"step_vs_exact\": %.4f, \"expected_parts\": [%s]}",
                  i ? ", " : "", q(block_name(b.shape)).c_str(), static_cast<long long>(b.shape.batch),
                  static_cast<long long>(b.shape.seq), static_cast<long long>(b.shape.d),
                  static_cast<long long>(b.shape.heads), static_cast<long long>(b.shape.kv_heads),
                  static_cast<long long>(b.shape.inter), static_cast<long long>(b.shape.rank),
                  q(memfit::bench::mode_name(b.mode)).c_str(), static_cast<long long>(b.kept),
                  per_token_d(b), static_cast<long long>(b.expected.total),
                  static_cast<double>(b.kept) / static_cast<double>(b.expected.total),
                  static_cast<double>(b.kept) / static_cast<double>(b.exact_kept),
                  static_cast<long long>(b.peak), b.step_ms, b.step_ms / b.exact_ms, parts.c_str());
    }
    std::printf("]");
  }
  std::printf("}\n");
}

// --- bandwidth: elementwise and row ops against a plain copy ------------------------------

struct BandwidthRow {
  std::string op, stock_op;
  int64_t rows = 0, cols = 0;
  double fwd_bytes = 0, bwd_bytes = 0;  // the least each pass must move
  double fwd_ms = 0, bwd_ms = 0, stock_fwd_ms = 0, stock_bwd_ms = 0;
};

// Median milliseconds of one call of fn, timed in batches of `inner` calls between
// synchronisations so a launch's latency does not hide the kernel's time.
double time_ms(const std::function<void()>& fn, int reps, int inner) {
  fn();
  sync();
  std::vector<double> v;
  for (int r = 0; r < reps; ++r) {
    const auto t0 = Clock::now();
    for (int i = 0; i < inner; ++i) fn();
    sync();
    v.push_back(std::chrono::duration<double, std::milli>(Clock::now() - t0).count() / inner);
  }
  return median(v);
}

// Bytes per second of at::Tensor::copy_ between two device tensors, counting the bytes
// read and the bytes written (the convention of the bandwidth fractions below).
double copy_bytes_per_s(const Options& o, int64_t n) {
  const auto dev = at::TensorOptions().device(o.device);
  at::Tensor a = at::randn({n}, dev), b = at::empty({n}, dev);
  const double ms = time_ms([&] { b.copy_(a); }, o.reps, o.device.is_cuda() ? 10 : 1);
  return 2.0 * static_cast<double>(a.nbytes()) / (ms * 1e-3);
}

std::vector<BandwidthRow> bandwidth_rows(const Options& o, double* copy_bps) {
  const bool cuda = o.device.is_cuda();
  const int64_t n = o.elements > 0 ? o.elements : (o.quick ? (int64_t{1} << 16) : cuda ? (int64_t{1} << 26) : (int64_t{1} << 22));
  const int inner = cuda ? 10 : 1;
  *copy_bps = copy_bytes_per_s(o, n);
  const auto dev = at::TensorOptions().device(o.device);
  struct Op {
    std::string name, stock_name;
    int64_t cols;
    double fwd_per_elem, bwd_per_elem;  // fp32 bytes each pass must move per element
    std::function<at::Tensor(const at::Tensor&)> memfit, stock;
  };
  // Approx-BP: forward reads x, writes y and a 2-bit code; backward reads dy and the code,
  // writes dx. MS norms: forward reads x, writes y; backward reads y and dy, writes dx
  // (per-row statistics are negligible). Dropout: a 1-bit mask instead of the 2-bit code.
  const std::vector<Op> ops = {
      {"regelu2", "gelu", 3072, 8.25, 8.25, [](const at::Tensor& x) { return memfit::ops::regelu2(x); },
       [](const at::Tensor& x) { return at::gelu(x); }},
      {"resilu2", "silu", 11008, 8.25, 8.25, [](const at::Tensor& x) { return memfit::ops::resilu2(x); },
       [](const at::Tensor& x) { return at::silu(x); }},
      {"ms_layer_norm", "layer_norm", 768, 8.0, 12.0,
       [](const at::Tensor& x) { return memfit::ops::ms_layer_norm(x, 1e-5); },
       [](const at::Tensor& x) { return at::layer_norm(x, {x.size(-1)}); }},
      {"ms_rms_norm", "rms_norm composite", 4096, 8.0, 12.0,
       [](const at::Tensor& x) { return memfit::ops::ms_rms_norm(x, 1e-6); },
       [](const at::Tensor& x) { return x * at::rsqrt(x.pow(2).mean(-1, true) + 1e-6); }},
      {"dropout (1-bit mask)", "dropout", 3072, 8.125, 8.125,
       [](const at::Tensor& x) { return memfit::ops::dropout(x, 0.1, true); },
       [](const at::Tensor& x) { return at::dropout(x, 0.1, true); }},
  };
  std::vector<BandwidthRow> rows;
  for (const Op& op : ops) {
    const int64_t cols = o.quick ? 256 : op.cols;
    const int64_t r = std::max<int64_t>(1, n / cols);
    const at::Tensor x = (at::randn({r, cols}, dev) * 2.0).requires_grad_(true);
    const at::Tensor dy = at::randn({r, cols}, dev);
    BandwidthRow row;
    row.op = op.name;
    row.stock_op = op.stock_name;
    row.rows = r;
    row.cols = cols;
    const double elems = static_cast<double>(r * cols);
    row.fwd_bytes = op.fwd_per_elem * elems;
    row.bwd_bytes = op.bwd_per_elem * elems;
    for (int side = 0; side < 2; ++side) {
      const auto& fn = side == 0 ? op.memfit : op.stock;
      const double f = time_ms([&] { at::Tensor y = fn(x); }, o.reps, inner);
      at::Tensor y = fn(x);
      const double b = time_ms(
          [&] { torch::autograd::grad({y}, {x}, {dy}, /*retain_graph=*/true); }, o.reps, inner);
      (side == 0 ? row.fwd_ms : row.stock_fwd_ms) = f;
      (side == 0 ? row.bwd_ms : row.stock_bwd_ms) = b;
    }
    rows.push_back(row);
  }
  return rows;
}

void print_bandwidth(const Options& o, const std::vector<BandwidthRow>& rows, double copy_bps) {
  const auto frac = [&](double bytes, double ms) { return bytes / (ms * 1e-3) / copy_bps; };
  if (o.json) {
    std::printf("{\"device\": %s, \"reps\": %d, \"copy_bytes_per_s\": %.6g, \"bandwidth\": [",
                q(o.device.str()).c_str(), o.reps, copy_bps);
    for (size_t i = 0; i < rows.size(); ++i) {
      const BandwidthRow& r = rows[i];
      std::printf("%s{\"op\": %s, \"stock_op\": %s, \"rows\": %lld, \"cols\": %lld, \"fwd_bytes\": %.0f, "
                  "\"bwd_bytes\": %.0f, \"fwd_ms\": %.5f, \"bwd_ms\": %.5f, \"stock_fwd_ms\": %.5f, "
                  "\"stock_bwd_ms\": %.5f, \"fwd_fraction\": %.4f, \"bwd_fraction\": %.4f}",
                  i ? ", " : "", q(r.op).c_str(), q(r.stock_op).c_str(), static_cast<long long>(r.rows),
                  static_cast<long long>(r.cols), r.fwd_bytes, r.bwd_bytes, r.fwd_ms, r.bwd_ms,
                  r.stock_fwd_ms, r.stock_bwd_ms, frac(r.fwd_bytes, r.fwd_ms), frac(r.bwd_bytes, r.bwd_ms));
    }
    std::printf("]}\n");
    return;
  }
  std::printf("copy: %.1f GB/s (read + written) on %s\n", copy_bps / 1e9, o.device.str().c_str());
  std::printf("%-22s %-12s %9s %9s %9s %9s %7s %7s\n", "op", "shape", "fwd ms", "stock", "bwd ms", "stock",
              "fwd bw", "bwd bw");
  for (const BandwidthRow& r : rows) {
    std::printf("%-22s %5lldx%-6lld %9.4f %9.4f %9.4f %9.4f %6.0f%% %6.0f%%\n", r.op.c_str(),
                static_cast<long long>(r.rows), static_cast<long long>(r.cols), r.fwd_ms, r.stock_fwd_ms,
                r.bwd_ms, r.stock_bwd_ms, 100 * frac(r.fwd_bytes, r.fwd_ms), 100 * frac(r.bwd_bytes, r.bwd_ms));
  }
}

int usage(const char* prog, const std::string& why) {
  std::fprintf(stderr,
               "%s: %s\nusage: %s [--json] [--reps N] [--threads N] [--quick] "
               "[--only ops|blocks|bandwidth] [--device cpu|cuda] [--elements N]\n",
               prog, why.c_str(), prog);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    const char* v = i + 1 < argc ? argv[i + 1] : nullptr;
    if (a == "--json") {
      o.json = true;
    } else if (a == "--quick") {
      o.quick = true;
    } else if (a == "--reps" || a == "--threads") {
      char* end = nullptr;
      const long n = v ? std::strtol(v, &end, 10) : 0;
      if (!v || *end != '\0' || n < 1 || n > 1000) return usage(argv[0], a + " needs an integer in 1..1000");
      (a == "--reps" ? o.reps : o.threads) = static_cast<int>(n);
      ++i;
    } else if (a == "--only") {
      if (!v || (std::strcmp(v, "ops") != 0 && std::strcmp(v, "blocks") != 0 &&
                 std::strcmp(v, "bandwidth") != 0)) {
        return usage(argv[0], "--only takes ops, blocks or bandwidth");
      }
      o.only = v;
      ++i;
    } else if (a == "--device") {
      if (!v || (std::strcmp(v, "cpu") != 0 && std::strcmp(v, "cuda") != 0)) {
        return usage(argv[0], "--device takes cpu or cuda");
      }
      if (std::strcmp(v, "cuda") == 0) {
        if (!torch::cuda::is_available()) return usage(argv[0], "--device cuda: no CUDA device is available");
        o.device = at::Device(at::kCUDA, 0);
      }
      ++i;
    } else if (a == "--elements") {
      char* end = nullptr;
      const long long n = v ? std::strtoll(v, &end, 10) : 0;
      if (!v || *end != '\0' || n < 1024 || n > (1LL << 32)) {
        return usage(argv[0], "--elements needs an integer in 1024..4294967296");
      }
      o.elements = n;
      ++i;
    } else if (a == "-h" || a == "--help") {
      usage(argv[0], "benchmark memfit's ops against stock LibTorch");
      return 0;
    } else {
      return usage(argv[0], "unknown argument '" + a + "'");
    }
  }
  g_device = o.device;
  MemoryMeter::install();
  at::set_num_threads(o.threads);
  at::manual_seed(0);
  std::vector<OpRow> ops;
  std::vector<BlockRow> blocks;
  try {
    if (o.only == "bandwidth") {
      double copy_bps = 0;
      const auto rows = bandwidth_rows(o, &copy_bps);
      print_bandwidth(o, rows, copy_bps);
      return 0;
    }
    if (o.only.empty() || o.only == "ops") ops = op_rows(o);
    if (o.only.empty() || o.only == "blocks") blocks = block_rows(o);
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "memfit-bench-ops: %s\n", e.what_without_backtrace());
    return 1;
  }
  if (o.json) {
    print_json(o, ops, blocks);
  } else {
    print_tables(o, ops, blocks);
  }
  return 0;
}
