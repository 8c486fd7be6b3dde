#include "estimator.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <limits>

#include "models.h"
#include "op_table.h"
#include "sim.h"

namespace memfit::estimator {

DeviceModel DeviceModel::cpu(int threads) {
  DeviceModel d;
  d.kind = Kind::kCPU;
  d.threads = std::max(1, threads);
  d.mean_backward_keeps_input = true;
  d.grad_buffer_in_place = false;
  return d;
}

DeviceModel DeviceModel::cuda() {
  DeviceModel d;
  d.kind = Kind::kCUDA;
  d.threads = 1;
  d.context_bytes = kCudaContextBytes;
  d.alloc_granularity = kCudaBlockBytes;
  d.reserved_overhead = kCudaReservedOverhead;
  d.workspace_bytes = kCudaWorkspaceBytes;
  d.mean_backward_keeps_input = false;
  d.grad_buffer_in_place = true;
  return d;
}

const std::vector<CudaConstants>& cuda_constants() {
  // Written from the GPU check's cuda_constants.json (docs/GPU.md, "Last results").
  static const std::vector<CudaConstants> table = {
      // 22 specs (GPT-2 124M, ViT-B/16, RoBERTa-base, LLaMA-7B-shaped, tiny models):
      // the allocator model's reserved peak + 5% and 800 MiB put the estimate at a median
      // of +4.6% over NVML's process peak, worst -4.7% (small LoRA jobs).
      {"NVIDIA H200", int64_t{800} << 20, 0.05, int64_t{64} << 20,
       "PyTorch 2.11.0+cu130, CUDA 13.0, driver 580.159.04, 2026-12-04"},
  };
  return table;
}

DeviceModel DeviceModel::cuda(const std::string& gpu_model) {
  DeviceModel d = cuda();
  for (const CudaConstants& c : cuda_constants()) {
    if (gpu_model == c.gpu_model) {
      d.context_bytes = c.context_bytes;
      d.reserved_overhead = c.reserved_overhead;
      d.workspace_bytes = c.workspace_bytes;
    }
  }
  return d;
}

namespace {

using sim::Tensor;

std::string str(int64_t v) { return std::to_string(v); }

// Largest sizes the estimator accepts. Products of these stay far below 2^63, so the
// simulator's checked sums are the only overflow guard needed.
constexpr int64_t kMaxBatch = int64_t{1} << 20;
constexpr int64_t kMaxSeq = int64_t{1} << 22;
constexpr int64_t kMaxDim = int64_t{1} << 20;
constexpr int64_t kMaxVocab = int64_t{1} << 24;
constexpr int64_t kMaxLayers = int64_t{1} << 14;
constexpr int64_t kMaxTensorBytes = int64_t{1} << 54;  // 16 PiB: one tensor beyond any device

void positive(int64_t v, int64_t max, const std::string& field) {
  if (v <= 0) throw EstimateError(field + ": must be positive, got " + str(v));
  if (v > max) throw EstimateError(field + ": " + str(v) + " is beyond what any device holds (at most " + str(max) + ")");
}

int64_t mul_checked(std::initializer_list<int64_t> f, const std::string& what) {
  int64_t r = 1;
  for (int64_t x : f) {
    if (__builtin_mul_overflow(r, x, &r) || r > kMaxTensorBytes) {
      throw EstimateError(what + " would exceed " + std::to_string(kMaxTensorBytes >> 50) +
                          " PiB in one tensor; no device holds this job");
    }
  }
  return r;
}

void validate(const Input& in) {
  const auto& c = in.config;
  const auto& j = in.job;
  const auto& t = j.training;
  if (c.arch != j.architecture) {
    throw EstimateError(std::string("config: the config.json is a ") + spec::name_of(c.arch) +
                        " model but the job's model.architecture is " + spec::name_of(j.architecture));
  }
  const bool vit = c.arch == spec::Architecture::kViT;
  positive(c.hidden, kMaxDim, "config: hidden size (hidden_size / n_embd)");
  positive(c.layers, kMaxLayers, "config: layer count (num_hidden_layers / n_layer)");
  positive(c.heads, kMaxDim, "config: attention heads (num_attention_heads / n_head)");
  positive(c.intermediate, kMaxDim * 8, "config: MLP width (intermediate_size / n_inner)");
  if (c.hidden % c.heads != 0) {
    throw EstimateError("config: hidden size " + str(c.hidden) + " is not a multiple of the " + str(c.heads) +
                        " attention heads");
  }
  if (c.arch == spec::Architecture::kLlama) {
    positive(c.kv_heads, kMaxDim, "config: num_key_value_heads");
    if (c.heads % c.kv_heads != 0) {
      throw EstimateError("config: num_attention_heads " + str(c.heads) + " is not a multiple of num_key_value_heads " +
                          str(c.kv_heads));
    }
  }
  if (!vit) positive(c.vocab_size, kMaxVocab, "config: vocab_size");
  if (c.arch != spec::Architecture::kLlama) positive(c.max_positions, kMaxSeq, "config: max positions");
  if (vit) {
    positive(c.image_size, 1 << 16, "config: image_size");
    positive(c.patch_size, c.image_size, "config: patch_size");
    positive(c.channels, 64, "config: num_channels");
    if (c.image_size % c.patch_size != 0) {
      throw EstimateError("config: image_size " + str(c.image_size) + " is not a multiple of patch_size " +
                          str(c.patch_size));
    }
    const int64_t tokens = (c.image_size / c.patch_size) * (c.image_size / c.patch_size) + 1;
    if (tokens != c.max_positions) {
      throw EstimateError("config: " + str(tokens) + " patches + [CLS] but " + str(c.max_positions) +
                          " position embeddings");
    }
  }
  const bool classify = j.task != spec::Task::kCausalLM;
  if (classify) positive(c.num_labels, kMaxVocab, "config: num_labels (id2label)");
  positive(t.micro_batch, kMaxBatch, "training.micro_batch");
  positive(t.gradient_accumulation, kMaxBatch, "training.gradient_accumulation");
  if (!vit) {
    positive(t.sequence_length, kMaxSeq, "training.sequence_length");
    if (j.task == spec::Task::kCausalLM && t.sequence_length < 2) {
      throw EstimateError("training.sequence_length: a causal LM needs at least 2 tokens, got " + str(t.sequence_length));
    }
    const bool learned_positions = c.arch != spec::Architecture::kLlama;
    const int64_t usable = c.arch == spec::Architecture::kRoberta ? c.max_positions - c.pad_token_id - 1 : c.max_positions;
    if (learned_positions && t.sequence_length > usable) {
      throw EstimateError("training.sequence_length: " + str(t.sequence_length) + " exceeds the model's " + str(usable) +
                          " positions");
    }
  }
  if (j.method == spec::Method::kLora) {
    positive(j.lora.rank, kMaxDim, "method.lora.rank");
    if (!(j.lora.dropout >= 0.0 && j.lora.dropout < 1.0)) {
      throw EstimateError("method.lora.dropout: must be in [0, 1), got " + std::to_string(j.lora.dropout));
    }
  }
  if (in.device.kind == DeviceModel::Kind::kCPU) positive(in.device.threads, 1 << 16, "device threads");
  if (in.device.context_bytes < 0) throw EstimateError("device context bytes: must be >= 0");
  if (in.device.alloc_granularity <= 0) throw EstimateError("device allocation granularity: must be positive");
  if (!(in.device.reserved_overhead >= 0.0 && in.device.reserved_overhead < 10.0)) {
    throw EstimateError("device reserved overhead: must be in [0, 10)");
  }
  if (in.source_image_size < 0 || in.source_image_size > (1 << 16)) {
    throw EstimateError("source image size: must be in [0, 65536]");
  }
  // The largest tensors the job forms, checked before any sum.
  const int64_t B = t.micro_batch;
  const int64_t S = vit ? c.max_positions : t.sequence_length;
  const int64_t wide = std::max({c.hidden * 3, c.intermediate, vit ? int64_t{1} : c.vocab_size});
  mul_checked({B, S, wide, 8}, "training.micro_batch x training.sequence_length x width");
  mul_checked({B, c.heads, S, S, 4}, "the attention scores (micro_batch x heads x sequence_length^2)");
  mul_checked({std::max(c.vocab_size, c.intermediate), c.hidden, 8}, "a weight matrix");
  mul_checked({c.layers, c.hidden, std::max(c.hidden, c.intermediate), 64}, "the model's weights");
}

sim::Batch make_batch(sim::Sim& s, const Input& in, bool cuda) {
  const auto& j = in.job;
  const auto& c = in.config;
  sim::Batch b;
  b.B = j.training.micro_batch;
  if (j.format == spec::DataFormat::kIdx || c.arch == spec::Architecture::kViT) {
    const int64_t I = c.image_size, src = in.source_image_size > 0 ? in.source_image_size : I;
    b.S = c.max_positions;
    if (!cuda) {
      Tensor raw = s.empty(b.B * src * src, 1);
      b.labels = s.empty(b.B, 8);
      Tensor x = s.empty(b.B * src * src, 4);
      if (src != I) x = s.empty(b.B * I * I, 4);
      if (c.channels > 1) x = s.empty(b.B * c.channels * I * I, 4);
      b.pixels = x;
    } else {
      b.pixels = s.empty(b.B * c.channels * I * I, 4);
      b.labels = s.empty(b.B, 8);
    }
    return b;
  }
  b.S = j.training.sequence_length;
  const int64_t T = b.B * b.S;
  b.ids = s.empty(T, 8);
  if (j.format == spec::DataFormat::kText || j.format == spec::DataFormat::kJsonlText) {
    b.labels = b.ids;
    return b;
  }
  b.mask = s.empty(T, 1);
  b.labels = s.empty(j.task == spec::Task::kCausalLM ? T : b.B, 8);
  return b;
}

}  // namespace

Estimate estimate(const Input& in) {
  validate(in);
  const bool cuda = in.device.kind == DeviceModel::Kind::kCUDA;
  sim::Runtime rt;
  rt.cuda = cuda;
  rt.threads = cuda ? 1 : in.device.threads;
  rt.mean_backward_keeps_input = in.device.mean_backward_keeps_input;
  sim::Sim s(in.device.alloc_granularity);
  if (cuda) s.timeline.model_cache(true);
  s.grad_buffer_in_place = in.device.grad_buffer_in_place;
  std::vector<Tensor> workspaces;  // cuBLAS's, held from the first product to the end
  if (!cuda && in.job.training.dtype == spec::DType::kBFloat16) s.cpu_bf16_gemm_threads = in.device.threads;
  Estimate e;
  auto m = sim::SimModel::create(in, s, rt);

  // init: the model, then AdamW's state.
  std::vector<Tensor> state;
  s.timeline.begin("init");
  m->materialize(in.load_weights);
  for (const Tensor& t : m->trainable()) {
    state.push_back(s.empty(t.numel, 4));
    state.push_back(s.empty(t.numel, 4));
    if (t.esize != 4) state.push_back(s.empty(t.numel, 4));
  }
  s.timeline.end();
  e.parameters = m->parameter_count();
  e.trainable_parameters = m->trainable_count();
  e.weights_bytes = m->weight_bytes();
  for (const Tensor& t : state) e.optimizer_bytes += t.block->charged;

  // One micro-batch. With gradient accumulation the later micro-batches run with every
  // gradient already formed (added in place): the same timeline plus the gradients not yet
  // formed at each moment, which the timeline's shadow tracks in the same pass.
  if (in.job.training.gradient_accumulation > 1) {
    int64_t grads = 0;
    for (const Tensor& t : m->trainable()) grads += m->grad_held_bytes(t, in.job.training.micro_batch);
    s.timeline.shadow(true, grads);
    s.on_first_grad = [&s](int64_t bytes) { s.timeline.shadow_add(-bytes); };
  }
  {
    s.timeline.begin("batch");
    sim::Batch b = make_batch(s, in, cuda);
    s.timeline.end();
    for (const Tensor* t : {&b.ids, &b.mask, &b.labels, &b.pixels}) {
      if (t->defined() && !(t == &b.labels && b.labels.block == b.ids.block)) e.batch_bytes += t->block->charged;
    }
    // LibTorch 2.x takes cuBLAS's workspaces from the caching allocator at the first
    // matrix product, one per thread that runs products (forward, and autograd's device
    // thread in backward), and keeps them.
    if (cuda && in.device.workspace_bytes > 0) {
      workspaces.push_back(s.empty(in.device.workspace_bytes / 2, 1));
      workspaces.push_back(s.empty(in.device.workspace_bytes - in.device.workspace_bytes / 2, 1));
    }
    const int64_t before = s.timeline.current();
    s.reset_kept();
    s.timeline.begin("forward");
    Tensor loss = m->forward(b, true);
    s.timeline.end();
    e.activation_bytes = s.timeline.current() - before;
    std::map<std::string, size_t> index;
    for (const auto& k : s.kept()) {
      auto it = index.find(*k.where);
      if (it == index.end()) {
        it = index.emplace(*k.where, e.activations.size()).first;
        e.activations.push_back(LayerKept{*k.where, 0, {}});
      }
      LayerKept& L = e.activations[it->second];
      L.bytes += k.bytes;
      auto op = std::find_if(L.ops.begin(), L.ops.end(), [&](const Item& i) { return i.name == k.op; });
      if (op == L.ops.end()) {
        L.ops.push_back({k.op, k.bytes});
      } else {
        op->bytes += k.bytes;
      }
      if (*k.where == "head") e.loss_bytes += k.bytes;
    }
    const int64_t at_backward = s.timeline.current();
    s.timeline.begin("backward");
    {
      Tensor scaled = s.empty(1, 4);
      s.record("div", {&loss}, {&scaled}, {}, [](sim::Grads& g) { return sim::Grads{g[0]}; });
      s.backward(scaled, s.empty(1, 4));
    }
    loss = Tensor{};
    s.drop_graph();
    s.timeline.end();
    e.backward_transient_bytes = s.timeline.phase_peaks().at("backward") - at_backward;
  }
  s.timeline.shadow(false, 0);
  s.on_first_grad = nullptr;
  for (const Tensor& t : m->trainable()) {
    if (t.edge.leaf != nullptr && t.edge.leaf->grad.defined()) e.gradient_bytes += t.edge.leaf->grad.block->charged;
  }

  // Optimizer step: clip (on CUDA one norm per gradient; on the CPU the squares are summed
  // in place), AdamW's transients, zero_grad.
  s.timeline.begin("optimizer");
  for (const Tensor& t : m->trainable()) {
    if (!cuda || t.edge.leaf == nullptr || !t.edge.leaf->grad.defined()) continue;
    Tensor n = s.empty(1, 4);
  }
  for (const Tensor& t : m->trainable()) {
    if (t.edge.leaf == nullptr || !t.edge.leaf->grad.defined()) continue;
    Tensor g = t.esize == 4 ? Tensor{} : s.empty(t.numel, 4);
    Tensor root = s.empty(t.numel, 4);
    Tensor step = s.empty(1, 8), scale = s.empty(1, 4);  // the step's scalars
    Tensor denom = s.empty(t.numel, 4);
  }
  for (const Tensor& t : m->trainable()) {
    if (t.edge.leaf != nullptr) t.edge.leaf->grad = Tensor{};
  }
  s.timeline.end();

  if (in.validation) {
    s.timeline.begin("eval");
    s.grad_mode = false;
    {
      sim::Batch b = make_batch(s, in, cuda);
      Tensor loss = m->forward(b, false);
    }
    s.grad_mode = true;
    s.timeline.end();
  }

  s.timeline.begin("export");
  m->simulate_export();
  s.timeline.end();

  e.phase_peaks = s.timeline.phase_peaks();
  e.allocated_peak_bytes = s.timeline.peak();
  for (const auto& [phase, bytes] : e.phase_peaks) {
    if (bytes == e.allocated_peak_bytes && e.peak_phase.empty()) e.peak_phase = phase;
  }
  // The phase order the worker runs them in decides ties.
  for (const char* p : {"init", "batch", "forward", "backward", "optimizer", "eval", "export"}) {
    auto it = e.phase_peaks.find(p);
    if (it != e.phase_peaks.end() && it->second == e.allocated_peak_bytes) {
      e.peak_phase = p;
      break;
    }
  }
  if (cuda) {
    // What the caching allocator's segments hold beyond the tensors at its peak (the
    // model in sim.h), plus the configured fraction for what the model misses.
    e.allocator_overhead_bytes =
        std::max<int64_t>(0, s.timeline.reserved_peak() - e.allocated_peak_bytes) +
        static_cast<int64_t>(std::ceil(static_cast<double>(e.allocated_peak_bytes) * in.device.reserved_overhead));
    e.context_bytes = in.device.context_bytes;
  }
  e.peak_bytes = e.allocated_peak_bytes + e.allocator_overhead_bytes + e.context_bytes;
  if (s.thread_slack > 0) {
    e.bound_slack_bytes += s.thread_slack;
    e.bounds.push_back("attention scratch counted as if all " + str(in.device.threads) +
                       " CPU threads held their largest buffers at once (up to " + format_size(s.thread_slack) +
                       " more than one thread's)");
  }
  if (s.gemm_slack > 0) {
    e.bound_slack_bytes += s.gemm_slack;
    e.bounds.push_back("CPU bf16 matrix products: oneDNN's packing buffers counted at a bound (up to " +
                       format_size(s.gemm_slack) + " per product over " + str(in.device.threads) + " threads)");
  }
  if (in.job.format == spec::DataFormat::kJsonlPromptCompletion ||
      in.job.format == spec::DataFormat::kJsonlClassification) {
    e.bounds.push_back("every row counted at training.sequence_length; the worker pads each batch only to its "
                       "longest row, so shorter texts need less");
  }
  return e;
}

int64_t parse_size(const std::string& text, const std::string& what) {
  size_t i = 0;
  while (i < text.size() && std::isspace(static_cast<unsigned char>(text[i]))) ++i;
  const size_t start = i;
  bool dot = false;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || (text[i] == '.' && !dot))) {
    dot = dot || text[i] == '.';
    ++i;
  }
  const std::string num = text.substr(start, i - start);
  std::string unit = text.substr(i);
  while (!unit.empty() && std::isspace(static_cast<unsigned char>(unit.front()))) unit.erase(unit.begin());
  while (!unit.empty() && std::isspace(static_cast<unsigned char>(unit.back()))) unit.pop_back();
  auto bad = [&]() {
    return EstimateError(what + ": '" + text + "' is not a size (examples: 16GiB, 800MiB, 80GB, 1073741824)");
  };
  if (num.empty() || num == ".") throw bad();
  std::string u;
  for (char ch : unit) u += static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  double mult = 1;
  if (u.empty() || u == "b") mult = 1;
  else if (u == "k" || u == "kb") mult = 1e3;
  else if (u == "m" || u == "mb") mult = 1e6;
  else if (u == "g" || u == "gb") mult = 1e9;
  else if (u == "t" || u == "tb") mult = 1e12;
  else if (u == "kib") mult = 1024.0;
  else if (u == "mib") mult = 1024.0 * 1024;
  else if (u == "gib") mult = 1024.0 * 1024 * 1024;
  else if (u == "tib") mult = 1024.0 * 1024 * 1024 * 1024;
  else throw bad();
  const double v = std::stod(num) * mult;
  if (!(v >= 1.0)) throw EstimateError(what + ": '" + text + "' must be at least one byte");
  if (v > 9.0e18) throw EstimateError(what + ": '" + text + "' is too large");
  return static_cast<int64_t>(std::llround(v));
}

std::string format_size(int64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (std::fabs(v) >= 1024.0 && u < 5) {
    v /= 1024.0;
    ++u;
  }
  char buf[32];
  if (u == 0) {
    std::snprintf(buf, sizeof buf, "%lld B", static_cast<long long>(bytes));
  } else {
    std::snprintf(buf, sizeof buf, "%.2f %s", v, units[u]);
  }
  return buf;
}

}  // namespace memfit::estimator
