#include "models.h"

#include <algorithm>
#include <set>

namespace memfit::estimator::sim {
namespace {

constexpr int64_t kF32 = 4;

bool is_lora(const spec::Job& j) { return j.method == spec::Method::kLora; }

}  // namespace

LinearW SimLinear::w() const {
  LinearW w;
  w.in = in;
  w.out = out;
  w.rank = rank;
  w.weight = weight;
  w.bias = bias;
  w.lora_a = lora_a;
  w.lora_b = lora_b;
  w.lora_dropout = lora_dropout;
  if (lora_a.defined() && norm != nullptr) {
    w.in_scale = true;
    w.in_shift = norm->has_beta;
  }
  return w;
}

SimModel::SimModel(const Input& in, Sim& s, const Runtime& rt)
    : in_(in), job_(in.job), cfg_(in.config), s_(s), rt_(rt) {
  esize_ = job_.training.dtype == spec::DType::kBFloat16 ? 2 : 4;
}

SimParam& SimModel::param(const std::string& name, int64_t numel, bool head) {
  params_.push_back(std::make_unique<SimParam>());
  SimParam& p = *params_.back();
  p.name = name;
  p.numel = numel;
  p.head = head;
  order_.push_back(name);
  return p;
}

SimLinear& SimModel::linear(const std::string& module, int64_t in, int64_t out, bool bias, bool conv1d,
                            bool in_block, bool head) {
  linears_.push_back(std::make_unique<SimLinear>());
  SimLinear& l = *linears_.back();
  l.module = module;
  l.short_name = module.substr(module.rfind('.') + 1);
  l.in = in;
  l.out = out;
  l.has_bias = bias;
  l.conv1d = conv1d;
  l.in_block = in_block;
  l.head = head;
  // Breakdown labels: the module path below the layer index ("mlp.c_fc").
  std::string rel = module;
  size_t start = 0;
  while (start < module.size()) {
    const size_t dot = module.find('.', start);
    const std::string part = module.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (!part.empty() && part.find_first_not_of("0123456789") == std::string::npos && dot != std::string::npos) {
      rel = module.substr(dot + 1);
      break;
    }
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  l.label = "linear(" + rel + ")";
  l.fused_label = "act_linear(" + rel + ")";
  l.swiglu_label = "swiglu_linear(" + rel + ")";
  return l;
}

SimNorm& SimModel::norm(const std::string& module, int64_t d, bool rms, bool bias) {
  norms_.push_back(std::make_unique<SimNorm>());
  SimNorm& n = *norms_.back();
  n.module = module;
  n.rms = rms;
  n.d = d;
  n.has_beta = bias;
  return n;
}

void SimModel::feeds(SimNorm& n, std::vector<SimLinear*> into) { feeds_.emplace_back(&n, std::move(into)); }

const Tensor& SimModel::p(const std::string& name) const {
  for (const auto& q : params_) {
    if (q->name == name) return q->t;
  }
  throw EstimateError("internal: no parameter " + name);
}

void SimModel::materialize(bool load_weights) {
  const bool full = job_.method == spec::Method::kFull;
  const bool lora = is_lora(job_);
  struct Slot {
    Tensor* t;
    int64_t numel;
    bool conv1d, head;
  };
  std::vector<Slot> slots;
  for (auto& q : params_) slots.push_back({&q->t, q->numel, false, q->head});
  for (auto& n : norms_) {
    slots.push_back({&n->gamma, n->d, false, false});
    if (n->has_beta) slots.push_back({&n->beta, n->d, false, false});
  }
  for (auto& l : linears_) {
    slots.push_back({&l->weight, l->in * l->out, l->conv1d, l->head});
    if (l->has_bias) slots.push_back({&l->bias, l->out, false, l->head});
  }
  // LoRA targets.
  std::set<std::string> targets(job_.lora.target_modules.begin(), job_.lora.target_modules.end());
  std::vector<SimLinear*> lora_layers;
  if (lora) {
    for (auto& l : linears_) {
      if (l->head) continue;
      if (targets.empty() ? l->in_block : targets.count(l->short_name) > 0) lora_layers.push_back(l.get());
    }
    for (const auto& t : targets) {
      bool hit = false;
      for (auto* l : lora_layers) hit = hit || l->short_name == t;
      if (!hit) {
        std::string names;
        std::set<std::string> seen;
        for (const auto& l : linears_) {
          if (l->in_block && seen.insert(l->short_name).second) names += (names.empty() ? "" : ", ") + l->short_name;
        }
        throw EstimateError("method.lora.target_modules: no linear layer named '" + t + "' in this " +
                            spec::name_of(job_.architecture) + " model (it has " + names + ")");
      }
    }
  }
  const bool ms = job_.memory.memory_sharing_norm;
  if (!rt_.cuda) {
    // Creation: every tensor in fp32 (randn / zeros / ones), in registration order.
    for (auto& sl : slots) *sl.t = s_.empty(sl.numel, kF32);
    if (load_weights) {
      for (auto& sl : slots) {
        if (sl.head && job_.task != spec::Task::kCausalLM) continue;  // a new head keeps its init
        Tensor a = s_.empty(sl.numel, kF32);
        if (sl.conv1d) a = s_.empty(sl.numel, kF32);  // transposed copy; the first goes
        *sl.t = a;
      }
    }
    for (auto* l : lora_layers) {
      l->lora_a = s_.empty(job_.lora.rank * l->in, kF32);
      l->lora_b = s_.empty(l->out * job_.lora.rank, kF32);
    }
    if (ms) {
      const int64_t block_rows_elems = int64_t{4} << 20;
      for (auto& [n, into] : feeds_) {
        for (SimLinear* l : into) {
          Tensor g64 = s_.empty(l->in, 8);
          Tensor b64 = n->has_beta ? s_.empty(l->in, 8) : Tensor{};
          Tensor w = s_.empty(l->in * l->out, kF32);
          Tensor bias64 = (n->has_beta || l->has_bias) ? s_.empty(l->out, 8) : Tensor{};
          {
            const int64_t rows = std::min(l->out, std::max<int64_t>(1, block_rows_elems / std::max<int64_t>(l->in, 1)));
            Tensor w64 = s_.empty(rows * l->in, 8);
            Tensor prod = s_.empty(rows * l->in, 8);
            prod = Tensor{};
            if (b64.defined()) Tensor mv = s_.empty(rows, 8);
          }
          Tensor b = bias64.defined() ? s_.empty(l->out, kF32) : Tensor{};
          l->weight = w;
          l->bias = b;
        }
        n->merged = true;
      }
    }
    if (esize_ != kF32) {
      auto move = [&](Tensor& t) {
        if (t.defined()) t = s_.empty(t.numel, esize_);
      };
      for (auto& q : params_) move(q->t);
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
    }
  } else {
    // CUDA: create, load, LoRA and merges happen on the host; the device receives each
    // final tensor once, in the job's dtype.
    if (ms) {
      for (auto& [n, into] : feeds_) n->merged = true;
    }
    auto put = [&](Tensor& t, int64_t numel) { t = s_.empty(numel, esize_); };
    for (auto& q : params_) put(q->t, q->numel);
    for (auto& n : norms_) {
      put(n->gamma, n->d);
      if (n->has_beta) put(n->beta, n->d);
    }
    for (auto& l : linears_) {
      put(l->weight, l->in * l->out);
      if (l->has_bias) put(l->bias, l->out);
    }
    for (auto* l : lora_layers) {
      put(l->lora_a, job_.lora.rank * l->in);
      put(l->lora_b, l->out * job_.lora.rank);
    }
    if (ms) {
      // A merged beta gives a linear without a bias one.
      for (auto& [n, into] : feeds_) {
        for (SimLinear* l : into) {
          if (n->has_beta && !l->bias.defined()) put(l->bias, l->out);
        }
      }
    }
  }
  for (auto& [n, into] : feeds_) {
    if (!ms) break;
    for (SimLinear* l : into) l->norm = n;
  }
  for (auto* l : lora_layers) {
    l->rank = job_.lora.rank;
    l->lora_dropout = job_.lora.dropout;
  }
  // Which tensors train: leaves receive gradients.
  auto train = [&](Tensor& t, const std::string& name, bool on) {
    if (t.defined() && on) t.edge = Edge{nullptr, 0, s_.new_leaf(t.esize, true)};
    (void)name;
  };
  for (auto& q : params_) train(q->t, q->name, full || q->head);
  for (auto& n : norms_) {
    train(n->gamma, n->module + ".weight", full && !n->merged);
    train(n->beta, n->module + ".bias", full && !n->merged);
  }
  for (auto& l : linears_) {
    train(l->weight, l->module + ".weight", full || l->head);
    train(l->bias, l->module + ".bias", full || l->head);
    train(l->lora_a, l->module + ".lora_A.weight", true);
    train(l->lora_b, l->module + ".lora_B.weight", true);
  }
  if (!rt_.cuda) {
    // The checkpointing anchor: a 0-dim CPU tensor that requires grad.
    anchor_ = s_.empty(1, kF32);
  } else {
    anchor_ = s_.empty(0, kF32);
  }
  anchor_.edge = Edge{nullptr, 0, s_.new_leaf(kF32, false)};
}

std::vector<Tensor> SimModel::trainable() const {
  std::vector<Tensor> out;
  auto add = [&](const Tensor& t) {
    if (t.defined() && t.requires_grad()) out.push_back(t);
  };
  for (const auto& q : params_) add(q->t);
  for (const auto& n : norms_) {
    add(n->gamma);
    add(n->beta);
  }
  for (const auto& l : linears_) {
    add(l->weight);
    add(l->bias);
    add(l->lora_a);
    add(l->lora_b);
  }
  return out;
}

int64_t SimModel::parameter_count() const {
  int64_t n = 0;
  for (const auto& q : params_) n += q->numel;
  for (const auto& l : linears_) n += l->weight.numel + (l->bias.defined() ? l->bias.numel : 0);
  for (const auto& m : norms_) n += m->gamma.numel + (m->beta.defined() ? m->beta.numel : 0);
  return n;
}

int64_t SimModel::trainable_count() const {
  int64_t n = 0;
  for (const auto& t : trainable()) n += t.numel;
  return n;
}

int64_t SimModel::weight_bytes() const {
  int64_t n = 0;
  auto add = [&](const Tensor& t) {
    if (t.defined()) n += t.block->charged;
  };
  for (const auto& q : params_) add(q->t);
  for (const auto& m : norms_) {
    add(m->gamma);
    add(m->beta);
  }
  for (const auto& l : linears_) {
    add(l->weight);
    add(l->bias);
    add(l->lora_a);
    add(l->lora_b);
  }
  return n;
}

int64_t SimModel::grad_held_bytes(const Tensor& t, int64_t) const { return s_.timeline.charge(t.numel * t.esize); }

void SimModel::simulate_export() {
  // Full weights: Model::export_state (each tensor produced, moved to the host, then the
  // next). On the host every produced copy stays until the file is written; on CUDA the
  // device holds one unmerge at a time. LoRA: only the adapter and the heads.
  const bool full = job_.method != spec::Method::kLora;
  std::vector<Tensor> host;  // copies alive until the write (CPU device only)
  for (const auto& l : linears_) {
    if (!full && !l->head) continue;
    Tensor w, b;
    if (l->norm != nullptr) {
      // Model::export_tensors: unmerge_norm_affine(w.to(f32), b.to(f32), gamma.to(f32),
      // beta.to(f32)) (the fp32 copies exist in bf16 jobs; all live through the call),
      // inside it g64, inv and b64 held to its end, then the result cast back.
      const SimNorm& n = *l->norm;
      const bool wlow = l->weight.esize != kF32;
      const bool nlow = n.gamma.defined() && n.gamma.esize != kF32;
      Tensor uw, ub;
      {
        Tensor betaf = n.has_beta && nlow ? s_.empty(l->in, kF32) : Tensor{};
        Tensor gf = nlow ? s_.empty(l->in, kF32) : Tensor{};
        Tensor bf = l->bias.defined() && wlow ? s_.empty(l->out, kF32) : Tensor{};
        Tensor wf = wlow ? s_.empty(l->weight.numel, kF32) : Tensor{};
        Tensor g64 = s_.empty(l->in, 8), inv = s_.empty(l->in, 8);
        Tensor b64 = n.has_beta ? s_.empty(l->in, 8) : Tensor{};
        uw = s_.empty(l->in * l->out, kF32);
        Tensor bias64 = l->has_bias ? s_.empty(l->out, 8) : Tensor{};
        {
          const int64_t rows = std::min(l->out, std::max<int64_t>(1, (int64_t{4} << 20) / std::max<int64_t>(l->in, 1)));
          Tensor a = s_.empty(rows * l->in, 8), c = s_.empty(rows * l->in, 8);
        }
        ub = l->has_bias ? s_.empty(l->out, kF32) : Tensor{};
      }
      w = wlow ? s_.empty(l->weight.numel, l->weight.esize) : uw;
      b = ub.defined() && wlow ? s_.empty(l->out, l->weight.esize) : ub;
    }
    if (l->conv1d) w = s_.empty(l->weight.numel, l->weight.esize);  // transposed, contiguous
    if (!rt_.cuda) {
      if (w.defined()) host.push_back(w);
      if (b.defined()) host.push_back(b);
    }
  }
}

// ---- forward building blocks (model.cpp) ----

Tensor SimModel::apply_norm(const SimNorm& n, const Tensor& x, int64_t rows) {
  if (job_.memory.memory_sharing_norm) {
    Tensor y = ms_norm(s_, x, rows, n.rms ? "ms_rms_norm" : "ms_layer_norm");
    return n.merged ? y : affine(s_, y, n.gamma, n.beta);
  }
  if (!n.rms) return layer_norm(s_, rt_, x, rows, n.gamma, n.beta);
  return rms_norm_composite(s_, rt_, x, rows, n.gamma);
}

Tensor SimModel::apply_linear(const SimLinear& l, const Tensor& x, int64_t rows, bool training) {
  return sim::linear(s_, x, rows, l.w(), training, l.label);
}

Tensor SimModel::activation(const Tensor& x) {
  const std::string& a = cfg_.activation;
  const bool tanh_ = a == "gelu_new" || a == "gelu_pytorch_tanh";
  if (job_.memory.approx_activation && a != "relu") {
    return approx_act(s_, x, a == "silu" ? "resilu2" : "regelu2");
  }
  if (a == "silu") return stock_act(s_, x, Act::kSiLU);
  if (a == "relu") return stock_act(s_, x, Act::kReLU);
  return stock_act(s_, x, tanh_ ? Act::kGELUTanh : Act::kGELU);
}

Tensor SimModel::mlp_tail(const Tensor& z, int64_t rows, const SimLinear& down, bool training) {
  const std::string& a = cfg_.activation;
  const LinearW w = down.w();
  const bool fused = a != "relu" && (job_.memory.preset == "memfit_best" ? w.needs_input() : job_.memory.fused_mlp);
  if (fused) return act_linear(s_, z, rows, w, training, down.fused_label);
  return apply_linear(down, activation(z), rows, training);
}

Tensor SimModel::swiglu_tail(const Tensor& g, const Tensor& u, int64_t rows, const SimLinear& down, bool training) {
  if (job_.memory.fused_mlp || job_.memory.preset == "memfit_best") {
    return swiglu_linear(s_, g, u, rows, down.w(), training, down.swiglu_label);
  }
  return apply_linear(down, mul(s_, activation(g), u), rows, training);
}

Tensor SimModel::attend(const Tensor& q, const Tensor& k, const Tensor& v, const AttnShape& a, const Tensor& key_mask) {
  if (job_.memory.efficient_attention) return attention(s_, rt_, q, k, v, key_mask, a);
  return stock_attention(s_, q, k, v, a, q.contiguous);
}

Tensor SimModel::block(const std::function<Tensor(const Tensor&)>& fn, const Tensor& x, bool training) {
  if (!(job_.memory.checkpointing && training && s_.grad_mode)) return fn(x);
  return checkpoint(s_, rt_, x, anchor_, fn);
}

bool SimModel::fused_loss_ok(const SimLinear* head) const {
  return job_.memory.fused_loss && (head == nullptr || (!head->lora_a.defined() && !head->bias.defined()));
}

Tensor SimModel::causal_lm_loss(const Tensor& logits, const Batch& b, int64_t vocab) {
  const int64_t rows = b.B * (b.S - 1);
  Tensor y = b.B > 1 ? s_.empty(rows, 8) : Tensor{};  // labels.narrow(1, 1).reshape(-1)
  {
    Tensor ne = s_.empty(rows, 1), count = s_.empty(1, 8);
  }
  Tensor loss = cross_entropy(s_, logits, rows, vocab);
  Tensor out = s_.empty(1, kF32);
  s_.record("div", {&loss}, {&out}, {}, [this](Grads&) { return Grads{s_.empty(1, kF32)}; });
  return out;
}

Tensor SimModel::fused_causal_lm_loss(const Tensor& h, const Tensor& weight, const Batch& b) {
  const int64_t rows = b.B * (b.S - 1), d = cfg_.hidden;
  Tensor hs = contiguous_copy(s_, part(s_, h, rows * d, b.B == 1, b.B == 1, "narrow"));
  Tensor y = b.B > 1 ? s_.empty(rows, 8) : Tensor{};
  {
    Tensor ne = s_.empty(rows, 1), count = s_.empty(1, 8);
  }
  {
    // masked_select(labels.ne(-100)) for the range check.
    Tensor ne = s_.empty(rows, 1), sel = s_.empty(rows, 8);
  }
  return linear_cross_entropy(s_, rt_, hs, rows, d, weight.numel / d, weight);
}

Tensor SimModel::classification_loss(const Tensor& logits, int64_t B, int64_t classes) {
  Tensor loss = cross_entropy(s_, logits, B, classes);
  Tensor out = s_.empty(1, kF32);
  s_.record("mean", {&loss}, {&out}, {}, [this](Grads&) { return Grads{s_.empty(1, kF32)}; });
  if (!s_.grad_mode) {
    Tensor am = s_.empty(B, 8), eq = s_.empty(B, 1);
  }
  return out;
}

Tensor SimModel::last_token(const Tensor& h, const Batch& b) {
  Tensor idx;
  if (b.mask.defined()) {
    Tensor l = s_.empty(b.B * b.S, 8);
    idx = s_.empty(b.B, 8);
  } else {
    idx = s_.empty(b.B, 8);
  }
  Tensor ar = s_.empty(b.B, 8);
  Tensor out = s_.empty(b.B * cfg_.hidden, h.esize);
  s_.record("index", {&h}, {&out}, {idx, ar}, [this, n = h.numel, es = h.esize](Grads&) {
    return Grads{s_.empty(n, es)};  // zeros_like(h).index_put_(..., accumulate)
  });
  return out;
}

Tensor SimModel::lm_loss(const Tensor& h, const Batch& b, const SimLinear* head, const std::string& tied) {
  if (fused_loss_ok(head)) return fused_causal_lm_loss(h, head ? head->weight : p(tied), b);
  const int64_t rows = b.B * (b.S - 1), d = cfg_.hidden, V = cfg_.vocab_size;
  Tensor hl = part(s_, h, rows * d, b.B == 1, b.B == 1, "narrow");
  Tensor logits = head ? apply_linear(*head, hl, rows, true) : stock_linear(s_, hl, rows, d, V, p(tied));
  hl = Tensor{};
  return causal_lm_loss(logits, b, V);
}

}  // namespace memfit::estimator::sim
