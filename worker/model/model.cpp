#include "model.h"

#include <ATen/ATen.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <set>

#include "norm_merge.h"

namespace memfit::model {

// Defined in the architecture files.
std::unique_ptr<Model> make_gpt2(const spec::Job& job, const ModelConfig& cfg);
std::unique_ptr<Model> make_llama(const spec::Job& job, const ModelConfig& cfg);
std::unique_ptr<Model> make_vit(const spec::Job& job, const ModelConfig& cfg);
std::unique_ptr<Model> make_bert(const spec::Job& job, const ModelConfig& cfg);

namespace {

bool is_lora(const spec::Job& j) { return j.method == spec::Method::kLora; }

// Checkpoint tensors that are buffers of Hugging Face modules, not parameters.
bool ignorable(const std::string& name) {
  static const char* kSuffixes[] = {".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq",
                                    "position_ids"};
  for (const char* s : kSuffixes) {
    const std::string suf(s);
    if (name.size() >= suf.size() && name.compare(name.size() - suf.size(), suf.size(), suf) == 0) return true;
  }
  // Pre-training heads of encoders (BERT's cls.predictions.*, cls.seq_relationship.*).
  return name.rfind("cls.", 0) == 0;
}

at::ScalarType scalar_of(io::StDType t) {
  switch (t) {
    case io::StDType::kF64: return at::kDouble;
    case io::StDType::kF32: return at::kFloat;
    case io::StDType::kF16: return at::kHalf;
    case io::StDType::kBF16: return at::kBFloat16;
    case io::StDType::kI64: return at::kLong;
    case io::StDType::kI32: return at::kInt;
    case io::StDType::kI16: return at::kShort;
    case io::StDType::kI8: return at::kChar;
    case io::StDType::kU8: return at::kByte;
    case io::StDType::kBool: return at::kBool;
  }
  return at::kFloat;
}

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// Activation checkpointing: forward runs the block without keeping anything but its
// input; backward runs it again with autograd on and back-propagates through it. The
// default CPU generator's state is replayed so that dropout draws the same masks.
struct CheckpointFn : public torch::autograd::Function<CheckpointFn> {
  using Fn = std::function<at::Tensor(const at::Tensor&)>;
  // `anchor` is a 0-dim tensor that requires grad: it keeps the node in the graph when
  // x does not (the first block after frozen embeddings), so that backward still
  // reaches the block's trainable parameters.
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& anchor, int64_t fn_ptr) {
    (void)anchor;
    const Fn& fn = *reinterpret_cast<const Fn*>(fn_ptr);
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      ctx->saved_data["rng"] = gen.get_state();
    }
    ctx->saved_data["fn"] = fn_ptr;
    ctx->save_for_backward({x});
    at::Tensor out = fn(x);
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const Fn& fn = *reinterpret_cast<const Fn*>(ctx->saved_data["fn"].toInt());
    const at::Tensor x = ctx->get_saved_variables()[0].detach().requires_grad_(true);
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    at::Tensor now;
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      now = gen.get_state();
      gen.set_state(ctx->saved_data["rng"].toTensor());
    }
    {
      at::AutoGradMode enable(true);
      const at::Tensor out = fn(x);
      torch::autograd::backward({out}, {grads[0]});
    }
    {
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(now);
    }
    return {x.grad(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

ops::LinearWeights Linear::weights() const {
  ops::LinearWeights w;
  w.weight = weight;
  w.bias = bias;
  if (lora_a.defined()) {
    w.lora_a = lora_a;
    w.lora_b = lora_b;
    w.lora_scale = lora_scale;
    w.lora_dropout = lora_dropout;
    if (norm != nullptr) {
      w.lora_in_scale = norm->gamma;
      w.lora_in_shift = norm->beta;
    }
  }
  return w;
}

std::unique_ptr<Model> Model::create(const spec::Job& job, const ModelConfig& cfg) {
  at::manual_seed(static_cast<int64_t>(job.init_seed));
  switch (job.architecture) {
    case spec::Architecture::kGPT2: return make_gpt2(job, cfg);
    case spec::Architecture::kLlama: return make_llama(job, cfg);
    case spec::Architecture::kViT: return make_vit(job, cfg);
    case spec::Architecture::kBert:
    case spec::Architecture::kRoberta: return make_bert(job, cfg);
  }
  return nullptr;
}

Model::Model(const spec::Job& job, const ModelConfig& cfg) : job_(job), cfg_(cfg) {}

at::Tensor& Model::param(const std::string& name, std::vector<int64_t> shape, double std, bool is_head) {
  params_[name] = at::randn(shape).mul_(std);  // in place: no second copy at init
  head_[name] = is_head;
  order_.push_back(name);
  return params_[name];
}

at::Tensor& Model::ones(const std::string& name, int64_t n) {
  params_[name] = at::ones({n});
  head_[name] = false;
  order_.push_back(name);
  return params_[name];
}

at::Tensor& Model::zeros(const std::string& name, std::vector<int64_t> shape, bool is_head) {
  params_[name] = at::zeros(shape);
  head_[name] = is_head;
  order_.push_back(name);
  return params_[name];
}

Linear& Model::linear(const std::string& module, int64_t in, int64_t out, bool bias, bool conv1d,
                      bool in_block, bool is_head) {
  auto l = std::make_unique<Linear>();
  l->module = module;
  l->short_name = module.substr(module.rfind('.') + 1);
  l->conv1d = conv1d;
  l->in_block = in_block;
  l->weight = at::randn({out, in}).mul_(0.02);
  if (bias) l->bias = at::zeros({out});
  l->had_bias = bias;
  head_[module + ".weight"] = is_head;
  if (bias) head_[module + ".bias"] = is_head;
  order_.push_back(module + ".weight");
  if (bias) order_.push_back(module + ".bias");
  linears_.push_back(std::move(l));
  return *linears_.back();
}

Norm& Model::norm(const std::string& module, int64_t d, bool rms, bool bias) {
  auto n = std::make_unique<Norm>();
  n->module = module;
  n->rms = rms;
  n->eps = cfg_.norm_eps;
  n->gamma = at::ones({d});
  if (bias) n->beta = at::zeros({d});
  head_[module + ".weight"] = false;
  order_.push_back(module + ".weight");
  if (bias) {
    head_[module + ".bias"] = false;
    order_.push_back(module + ".bias");
  }
  norms_.push_back(std::move(n));
  return *norms_.back();
}

void Model::feeds(Norm& n, std::vector<Linear*> into) { feeds_[&n] = std::move(into); }

namespace {

// Where a named tensor lives: a plain parameter, a linear's weight/bias or a norm's.
struct Slot {
  at::Tensor* tensor = nullptr;
  bool transpose = false;  // Conv1D weights are [in, out] in the checkpoint
};

}  // namespace

void Model::load(const io::Checkpoint& ckpt, std::vector<std::string>* fresh) {
  std::map<std::string, Slot> slots;
  for (auto& [name, t] : params_) slots[name] = {&t, false};
  for (auto& l : linears_) {
    slots[l->module + ".weight"] = {&l->weight, l->conv1d};
    if (l->bias.defined()) slots[l->module + ".bias"] = {&l->bias, false};
  }
  for (auto& n : norms_) {
    slots[n->module + ".weight"] = {&n->gamma, false};
    if (n->beta.defined()) slots[n->module + ".bias"] = {&n->beta, false};
  }
  // Checkpoints of the bare base model lack the task model's prefix ("bert.", ...).
  std::set<std::string> available;
  for (const auto& n : ckpt.names()) available.insert(n);
  auto source_name = [&](const std::string& name) -> std::string {
    if (available.count(name)) return name;
    const auto dot = name.find('.');
    if (dot != std::string::npos && available.count(name.substr(dot + 1))) return name.substr(dot + 1);
    return "";
  };
  std::vector<std::string> missing, bad_shape, bad_dtype;
  std::set<std::string> used;
  for (const std::string& name : order_) {
    const Slot& slot = slots.at(name);
    const std::string src = source_name(name);
    if (src.empty()) {
      if (head_.at(name)) {
        if (fresh) fresh->push_back(name);
      } else if (!(name == "lm_head.weight" && cfg_.tie_word_embeddings)) {
        missing.push_back(name);
      }
      continue;
    }
    used.insert(src);
    const auto [file, info] = ckpt.find(src);
    const at::ScalarType st = scalar_of(info->dtype);
    if (!at::isFloatingType(st)) {
      bad_dtype.push_back(src + " (" + io::dtype_name(info->dtype) + ")");
      continue;
    }
    at::Tensor t = at::from_blob(const_cast<uint8_t*>(file->data(*info)), info->shape,
                                 at::TensorOptions().dtype(st))
                       .to(at::kFloat, /*non_blocking=*/false, /*copy=*/true);
    if (slot.transpose) t = t.t().contiguous();
    if (t.sizes() != slot.tensor->sizes()) {
      bad_shape.push_back(src + ": " + shape_str(t.sizes()) + " in the checkpoint, the config needs " +
                          shape_str(slot.tensor->sizes()));
      continue;
    }
    *slot.tensor = t;
  }
  std::vector<std::string> unexpected;
  for (const auto& n : available) {
    if (!used.count(n) && !ignorable(n) && !(n == "lm_head.weight" && cfg_.tie_word_embeddings)) {
      unexpected.push_back(n);
    }
  }
  if (missing.empty() && unexpected.empty() && bad_shape.empty() && bad_dtype.empty()) return;
  std::string msg = "weights do not match the model config:";
  auto list = [&](const char* what, const std::vector<std::string>& v) {
    if (v.empty()) return;
    msg += std::string("\n  ") + what + " (" + std::to_string(v.size()) + "):";
    for (size_t i = 0; i < v.size() && i < 20; ++i) msg += "\n    " + v[i];
    if (v.size() > 20) msg += "\n    ... and " + std::to_string(v.size() - 20) + " more";
  };
  list("missing", missing);
  list("unexpected", unexpected);
  list("wrong shape", bad_shape);
  list("not floating point", bad_dtype);
  throw io::IoError(msg);
}

void Model::prepare(const at::Device& device) {
  device_ = device;
  const bool lora = is_lora(job_);
  const bool full = job_.method == spec::Method::kFull;
  // Which tensors train.
  for (auto& [name, t] : params_) t.requires_grad_(full || head_.at(name));
  for (auto& n : norms_) {
    n->gamma.requires_grad_(full);
    if (n->beta.defined()) n->beta.requires_grad_(full);
  }
  std::set<std::string> targets(job_.lora.target_modules.begin(), job_.lora.target_modules.end());
  std::set<std::string> matched;
  for (auto& l : linears_) {
    const bool head = head_.at(l->module + ".weight");
    l->weight.requires_grad_(full || head);
    if (l->bias.defined()) l->bias.requires_grad_(full || head);
    if (!lora || head) continue;
    const bool hit = targets.empty() ? l->in_block : targets.count(l->short_name) > 0;
    if (!hit) continue;
    matched.insert(l->short_name);
    const int64_t in = l->weight.size(1), out = l->weight.size(0), r = job_.lora.rank;
    // PEFT's initialisation: A ~ kaiming_uniform(a = sqrt 5) = U(-1/sqrt(in), 1/sqrt(in)), B = 0.
    const double bound = 1.0 / std::sqrt(static_cast<double>(in));
    l->lora_a = at::rand({r, in}).mul_(2.0).sub_(1.0).mul_(bound).requires_grad_(true);
    l->lora_b = at::zeros({out, r}).requires_grad_(true);
    l->lora_scale = job_.lora.alpha / static_cast<double>(r);
    l->lora_dropout = job_.lora.dropout;
  }
  for (const auto& t : targets) {
    if (!matched.count(t)) {
      std::string names;
      std::set<std::string> seen;
      for (const auto& l : linears_) {
        if (l->in_block && seen.insert(l->short_name).second) names += (names.empty() ? "" : ", ") + l->short_name;
      }
      throw spec::SpecError("method.lora.target_modules: no linear layer named '" + t + "' in this " +
                            spec::name_of(job_.architecture) + " model (it has " + names + ")");
    }
  }
  // Memory-sharing norms: merge each norm's affine into the linears it feeds. Full
  // fine-tuning then trains the merged weights; the norm's own parameters stay fixed.
  if (job_.memory.memory_sharing_norm) {
    for (auto& [norm, into] : feeds_) {
      Norm* n = const_cast<Norm*>(norm);
      for (Linear* l : into) {
        const bool rg = l->weight.requires_grad();
        const ops::MergedLinear m = ops::merge_norm_affine(l->weight.detach(), l->bias.defined() ? l->bias.detach() : at::Tensor(),
                                                           n->gamma.detach(), n->beta.defined() ? n->beta.detach() : at::Tensor());
        l->weight = m.weight.requires_grad_(rg);
        l->bias = m.bias.defined() ? m.bias.requires_grad_(rg) : at::Tensor();
        l->norm = n;
      }
      n->merged = true;
      if (n->gamma.requires_grad()) {
        folded_norm_parameters_ += n->gamma.numel() + (n->beta.defined() ? n->beta.numel() : 0);
      }
      n->gamma = n->gamma.detach();
      if (n->beta.defined()) n->beta = n->beta.detach();
    }
  }
  // Device and dtype. Trainable tensors become new leaves on the device.
  const at::ScalarType dt = job_.training.dtype == spec::DType::kBFloat16 ? at::kBFloat16 : at::kFloat;
  auto move = [&](at::Tensor& t) {
    if (!t.defined()) return;
    const bool rg = t.requires_grad();
    t = t.detach().to(device, dt).contiguous();
    if (rg) t.requires_grad_(true);
  };
  for (auto& [name, t] : params_) move(t);
  for (auto& n : norms_) {
    move(n->gamma);
    move(n->beta);
  }
  for (auto& l : linears_) {
    move(l->weight);
    move(l->bias);
    move(l->lora_a);
    move(l->lora_b);
  }
  on_prepared();
}

void Model::on_prepared() {}

std::vector<at::Tensor> Model::trainable() const {
  std::vector<at::Tensor> out;
  for (const auto& [name, t] : trainable_state()) out.push_back(t);
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> Model::trainable_state() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const std::string& name : order_) {
    const auto p = params_.find(name);
    if (p != params_.end() && p->second.requires_grad()) out.emplace_back(name, p->second);
  }
  for (const auto& n : norms_) {
    if (n->gamma.requires_grad()) out.emplace_back(n->module + ".weight", n->gamma);
    if (n->beta.defined() && n->beta.requires_grad()) out.emplace_back(n->module + ".bias", n->beta);
  }
  for (const auto& l : linears_) {
    if (l->weight.requires_grad()) out.emplace_back(l->module + ".weight", l->weight);
    if (l->bias.defined() && l->bias.requires_grad()) out.emplace_back(l->module + ".bias", l->bias);
    if (l->lora_a.defined()) {
      out.emplace_back(l->module + ".lora_A.weight", l->lora_a);
      out.emplace_back(l->module + ".lora_B.weight", l->lora_b);
    }
  }
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> Model::grads() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  auto add = [&](const std::string& name, const at::Tensor& t, bool transpose) {
    if (t.defined() && t.grad().defined()) {
      at::Tensor g = t.grad().detach().to(at::kCPU);
      out.emplace_back(name, (transpose ? g.t() : g).contiguous());
    }
  };
  for (const std::string& name : order_) {
    const auto p = params_.find(name);
    if (p != params_.end()) add(name, p->second, false);
  }
  for (const auto& n : norms_) {
    add(n->module + ".weight", n->gamma, false);
    add(n->module + ".bias", n->beta, false);
  }
  for (const auto& l : linears_) {
    add(l->module + ".weight", l->weight, l->conv1d);
    add(l->module + ".bias", l->bias, false);
    add(l->module + ".lora_A.weight", l->lora_a, false);
    add(l->module + ".lora_B.weight", l->lora_b, false);
  }
  return out;
}

int64_t Model::trainable_count() const {
  int64_t n = 0;
  for (const auto& t : trainable()) n += t.numel();
  return n;
}

int64_t Model::parameter_count() const {
  int64_t n = 0;
  for (const auto& [name, t] : params_) n += t.numel();
  for (const auto& l : linears_) n += l->weight.numel() + (l->bias.defined() ? l->bias.numel() : 0);
  for (const auto& nm : norms_) n += nm->gamma.numel() + (nm->beta.defined() ? nm->beta.numel() : 0);
  return n;
}

// Each tensor is produced (unmerged, transposed) and moved to the host before the next,
// so that a CUDA device holds at most one exported copy at a time. `want` filters names.
std::vector<std::pair<std::string, at::Tensor>> Model::export_tensors(
    const std::function<bool(const std::string&)>& want) const {
  at::NoGradGuard ng;
  std::map<std::string, const at::Tensor*> plain;
  for (const auto& [name, t] : params_) plain[name] = &t;
  for (const auto& n : norms_) {
    plain[n->module + ".weight"] = &n->gamma;
    if (n->beta.defined()) plain[n->module + ".bias"] = &n->beta;
  }
  std::map<std::string, const Linear*> linear_of;
  for (const auto& l : linears_) {
    linear_of[l->module + ".weight"] = l.get();
    if (l->had_bias || l->bias.defined()) linear_of[l->module + ".bias"] = l.get();
  }
  std::vector<std::pair<std::string, at::Tensor>> out;
  at::Tensor pending_bias;  // the unmerged bias of the linear whose weight came last
  std::string pending_name;
  for (const std::string& name : order_) {
    if (!want(name)) continue;
    const auto p = plain.find(name);
    if (p != plain.end()) {
      out.emplace_back(name, p->second->detach().to(at::kCPU).contiguous());
      continue;
    }
    const Linear& l = *linear_of.at(name);
    const bool is_weight = name == l.module + ".weight";
    if (!is_weight && name == pending_name) {
      out.emplace_back(name, pending_bias);
      pending_bias.reset();
      pending_name.clear();
      continue;
    }
    at::Tensor w = l.weight.detach(), b = l.bias.defined() ? l.bias.detach() : at::Tensor();
    if (l.norm != nullptr) {
      const ops::MergedLinear u = ops::unmerge_norm_affine(
          w.to(at::kFloat), b.defined() ? b.to(at::kFloat) : b, l.norm->gamma.to(at::kFloat),
          l.norm->beta.defined() ? l.norm->beta.to(at::kFloat) : at::Tensor(), l.had_bias);
      w = u.weight.to(l.weight.scalar_type());
      b = u.bias.defined() ? u.bias.to(l.weight.scalar_type()) : at::Tensor();
    }
    if (is_weight) {
      out.emplace_back(name, (l.conv1d ? w.t() : w).to(at::kCPU).contiguous());
      if (b.defined() && l.had_bias) {
        pending_bias = b.to(at::kCPU).contiguous();
        pending_name = l.module + ".bias";
      }
    } else {
      out.emplace_back(name, b.to(at::kCPU).contiguous());
    }
  }
  return out;
}

std::vector<std::pair<std::string, at::Tensor>> Model::export_state() const {
  return export_tensors([](const std::string&) { return true; });
}

std::vector<std::pair<std::string, at::Tensor>> Model::export_adapter() const {
  std::vector<std::pair<std::string, at::Tensor>> out;
  for (const auto& l : linears_) {
    if (!l->lora_a.defined()) continue;
    out.emplace_back("base_model.model." + l->module + ".lora_A.weight", l->lora_a.detach().to(at::kCPU).contiguous());
    out.emplace_back("base_model.model." + l->module + ".lora_B.weight", l->lora_b.detach().to(at::kCPU).contiguous());
  }
  // Trained heads (PEFT's modules_to_save), under their own names; only they are exported.
  for (auto& [name, t] : export_tensors([this](const std::string& n) { return head_.at(n); })) {
    out.emplace_back("base_model.model." + name, std::move(t));
  }
  return out;
}

std::vector<std::string> Model::lora_modules() const {
  std::set<std::string> s;
  for (const auto& l : linears_) {
    if (l->lora_a.defined()) s.insert(l->short_name);
  }
  return {s.begin(), s.end()};
}

std::vector<std::string> Model::head_modules() const {
  std::set<std::string> s;
  for (const auto& [name, head] : head_) {
    if (head) s.insert(name.substr(0, name.find('.')));
  }
  return {s.begin(), s.end()};
}

// ---- forward building blocks ----

at::Tensor Model::apply_norm(const Norm& n, const at::Tensor& x) const {
  if (job_.memory.memory_sharing_norm) {
    at::Tensor y = n.rms ? ops::ms_rms_norm(x, n.eps) : ops::ms_layer_norm(x, n.eps);
    return n.merged ? y : affine(n, y);
  }
  if (!n.rms) return at::layer_norm(x, {x.size(-1)}, n.gamma, n.beta, n.eps);
  // LLaMA's RMSNorm, computed in fp32 as the reference code does.
  const at::Tensor xf = x.to(at::kFloat);
  return (xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + n.eps)).to(x.scalar_type()) * n.gamma;
}

at::Tensor Model::affine(const Norm& n, const at::Tensor& y) const {
  at::Tensor z = y * n.gamma;
  return n.beta.defined() ? z + n.beta : z;
}

at::Tensor Model::apply_linear(const Linear& l, const at::Tensor& x, bool training) const {
  return ops::linear(x, l.weights(), training);
}

at::Tensor Model::activation(const at::Tensor& x) const {
  const std::string& a = cfg_.activation;
  const bool tanh = a == "gelu_new" || a == "gelu_pytorch_tanh";
  if (job_.memory.approx_activation && a != "relu") {
    if (a == "silu") return ops::resilu2(x);
    return tanh ? ops::regelu2_tanh(x) : ops::regelu2(x);
  }
  if (a == "silu") return at::silu(x);
  if (a == "relu") return at::relu(x);
  return at::gelu(x, tanh ? "tanh" : "none");
}

namespace {
bool needs_input(const Linear& l) { return l.weight.requires_grad() || l.lora_a.defined(); }
}  // namespace

at::Tensor Model::mlp_tail(const at::Tensor& z, const Linear& down, bool training) const {
  const std::string& a = cfg_.activation;
  // memfit_best: keep the pre-activation when the next layer keeps its input anyway;
  // when it keeps nothing, 2-bit flags are cheaper.
  const bool fused = a != "relu" && (job_.memory.preset == "memfit_best" ? needs_input(down) : job_.memory.fused_mlp);
  if (fused) {
    const ops::MlpAct act = a == "silu" ? ops::MlpAct::kSiLU
                            : (a == "gelu_new" || a == "gelu_pytorch_tanh") ? ops::MlpAct::kGELUTanh
                                                                             : ops::MlpAct::kGELU;
    return ops::act_linear(act, z, down.weights(), training);
  }
  return apply_linear(down, activation(z), training);
}

bool Model::fused_loss_ok(const Linear* head) const {
  return job_.memory.fused_loss && !keep_logits_ && (head == nullptr || (!head->lora_a.defined() && !head->bias.defined()));
}

at::Tensor Model::swiglu_tail(const at::Tensor& g, const at::Tensor& u, const Linear& down, bool training) const {
  if (job_.memory.fused_mlp || job_.memory.preset == "memfit_best") {
    return ops::swiglu_linear(g, u, down.weights(), training);
  }
  return apply_linear(down, activation(g) * u, training);
}

at::Tensor Model::attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                         const at::Tensor& key_mask) const {
  const int64_t B = q.size(0), S = q.size(1), H = q.size(2), D = q.size(3), Hk = k.size(2);
  if (job_.memory.efficient_attention) {
    ops::AttentionOptions o;
    o.causal = causal;
    o.key_padding_mask = key_mask;
    return ops::attention(q, k, v, o).view({B, S, H * D});
  }
  // The composite Hugging Face's eager attention computes.
  const at::Tensor kk = H == Hk ? k : k.repeat_interleave(H / Hk, 2);
  const at::Tensor vv = H == Hk ? v : v.repeat_interleave(H / Hk, 2);
  at::Tensor s = at::matmul(q.transpose(1, 2), kk.transpose(1, 2).transpose(2, 3)) *
                 (1.0 / std::sqrt(static_cast<double>(D)));
  if (causal) {
    const at::Tensor hidden = at::ones({S, k.size(1)}, q.options().dtype(at::kBool)).triu(1);
    s = s.masked_fill(hidden, -std::numeric_limits<float>::infinity());
  }
  if (key_mask.defined()) {
    s = s.masked_fill(key_mask.logical_not().view({B, 1, 1, k.size(1)}), -std::numeric_limits<float>::infinity());
  }
  const at::Tensor p = at::softmax(s, -1, at::kFloat).to(q.scalar_type());
  return at::matmul(p, vv.transpose(1, 2)).transpose(1, 2).reshape({B, S, H * D});
}

at::Tensor Model::block(const std::function<at::Tensor(const at::Tensor&)>& fn, const at::Tensor& x,
                        bool training) const {
  if (!(job_.memory.checkpointing && training && at::GradMode::is_enabled())) return fn(x);
  // The function must outlive the graph: the model keeps it until the next forward.
  auto held = std::make_shared<CheckpointFn::Fn>(fn);
  checkpoint_fns_.push_back(held);
  static const at::Tensor anchor = at::zeros({}).requires_grad_(true);
  return CheckpointFn::apply(x, anchor, reinterpret_cast<int64_t>(held.get()));
}

void Model::begin_forward() const { checkpoint_fns_.clear(); }

// ---- losses ----

Output causal_lm_loss(const at::Tensor& logits, const at::Tensor& labels, bool training, bool keep_logits) {
  // Predict token t + 1 from position t; -100 labels are ignored. logits cover either
  // every position or all but the last (the models drop it before the head when they
  // need not return the logits, which spares a [tokens, vocab] copy here).
  const int64_t V = logits.size(-1), S = labels.size(1);
  const at::Tensor l = (logits.size(1) == S ? logits.narrow(1, 0, S - 1) : logits).reshape({-1, V}).to(at::kFloat);
  const at::Tensor y = labels.narrow(1, 1, S - 1).reshape({-1});
  Output o;
  o.count = y.ne(-100).sum().item<int64_t>();
  o.loss = o.count > 0 ? at::cross_entropy_loss(l, y, {}, at::Reduction::Sum, -100) / static_cast<double>(o.count)
                       : (l.sum() * 0.0);
  (void)training;
  if (keep_logits) o.logits = logits;
  return o;
}

Output fused_causal_lm_loss(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& labels) {
  const int64_t S = h.size(1), d = h.size(2);
  const at::Tensor hs = h.narrow(1, 0, S - 1).reshape({-1, d});
  const at::Tensor y = labels.narrow(1, 1, S - 1).reshape({-1});
  Output o;
  o.count = y.ne(-100).sum().item<int64_t>();
  o.loss = ops::linear_cross_entropy(hs, weight, y);
  return o;
}

Output classification_loss(const at::Tensor& logits, const at::Tensor& labels, bool training, bool keep_logits) {
  Output o;
  const at::Tensor l = logits.to(at::kFloat);
  o.count = labels.size(0);
  o.loss = at::cross_entropy_loss(l, labels, {}, at::Reduction::Mean, -100);
  if (!training) o.correct = l.argmax(-1).eq(labels).sum().item<int64_t>();
  if (keep_logits) o.logits = logits;
  return o;
}

}  // namespace memfit::model
