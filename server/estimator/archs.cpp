// The four architectures of worker/model/{gpt2,llama,vit,bert}.cpp on the simulator.
// Locals are kept exactly as long as the worker keeps them (a `const at::Tensor` local
// there is a `Tensor` local here), because that decides what is alive at each peak.
#include <string>

#include "models.h"

namespace memfit::estimator::sim {
namespace {

constexpr int64_t kF32 = 4;

std::string layer_name(size_t i) { return "layer " + std::to_string(i); }

class Gpt2 final : public SimModel {
 public:
  Gpt2(const Input& in, Sim& s, const Runtime& rt) : SimModel(in, s, rt) {
    const auto& c = cfg_;
    const int64_t d = c.hidden;
    param("transformer.wte.weight", c.vocab_size * d);
    param("transformer.wpe.weight", c.max_positions * d);
    for (int64_t i = 0; i < c.layers; ++i) {
      const std::string p = "transformer.h." + std::to_string(i) + ".";
      Layer L;
      L.ln1 = &norm(p + "ln_1", d, false, true);
      L.attn = &linear(p + "attn.c_attn", d, 3 * d, true, true);
      L.proj = &linear(p + "attn.c_proj", d, d, true, true);
      L.ln2 = &norm(p + "ln_2", d, false, true);
      L.fc = &linear(p + "mlp.c_fc", d, c.intermediate, true, true);
      L.fc_proj = &linear(p + "mlp.c_proj", c.intermediate, d, true, true);
      feeds(*L.ln1, {L.attn});
      feeds(*L.ln2, {L.fc});
      layers_.push_back(L);
    }
    ln_f_ = &norm("transformer.ln_f", d, false, true);
    if (job_.task == spec::Task::kSequenceClassification) {
      score_ = &linear("score", d, c.num_labels, false, false, false, true);
    } else if (!c.tie_word_embeddings) {
      head_ = &linear("lm_head", d, c.vocab_size, false, false, false);
    }
  }

  Tensor forward(const Batch& b, bool training) override {
    const int64_t B = b.B, S = b.S, T = B * S, d = cfg_.hidden, H = cfg_.heads, D = cfg_.head_dim();
    s_.set_where("embeddings");
    Tensor pos = s_.empty(S, 8);
    Tensor x = add(s_, embedding(s_, p("transformer.wte.weight"), b.ids, T, d),
                   embedding(s_, p("transformer.wpe.weight"), pos, S, d));
    const AttnShape a{B, S, H, H, D, true, b.mask.defined()};
    const Tensor mask = b.mask;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer L = layers_[i];
      s_.set_where(layer_name(i));
      x = block([=](const Tensor& xin) {
        const Tensor qkv = apply_linear(*L.attn, apply_norm(*L.ln1, xin, T), T, training);
        const Tensor at = attend(part(s_, qkv, T * d, false, false, "select"), part(s_, qkv, T * d, false, false, "select"),
                                 part(s_, qkv, T * d, false, false, "select"), a, mask);
        const Tensor x1 = add(s_, xin, apply_linear(*L.proj, at, T, training));
        const Tensor z = apply_linear(*L.fc, apply_norm(*L.ln2, x1, T), T, training);
        return add(s_, x1, mlp_tail(z, T, *L.fc_proj, training));
      }, x, training);
    }
    s_.set_where("head");
    const Tensor h = apply_norm(*ln_f_, x, T);
    if (score_ != nullptr) {
      return classification_loss(apply_linear(*score_, last_token(h, b), B, training), B, cfg_.num_labels);
    }
    return lm_loss(h, b, head_, "transformer.wte.weight");
  }

 private:
  struct Layer {
    SimNorm *ln1, *ln2;
    SimLinear *attn, *proj, *fc, *fc_proj;
  };
  std::vector<Layer> layers_;
  SimNorm* ln_f_ = nullptr;
  SimLinear* score_ = nullptr;
  SimLinear* head_ = nullptr;
};

class Llama final : public SimModel {
 public:
  Llama(const Input& in, Sim& s, const Runtime& rt) : SimModel(in, s, rt) {
    const auto& c = cfg_;
    const int64_t d = c.hidden, D = c.head_dim();
    param("model.embed_tokens.weight", c.vocab_size * d);
    for (int64_t i = 0; i < c.layers; ++i) {
      const std::string p = "model.layers." + std::to_string(i) + ".";
      Layer L;
      L.ln1 = &norm(p + "input_layernorm", d, true, false);
      L.q = &linear(p + "self_attn.q_proj", d, c.heads * D, c.qkv_bias);
      L.k = &linear(p + "self_attn.k_proj", d, c.kv_heads * D, c.qkv_bias);
      L.v = &linear(p + "self_attn.v_proj", d, c.kv_heads * D, c.qkv_bias);
      L.o = &linear(p + "self_attn.o_proj", c.heads * D, d, c.qkv_bias);
      L.ln2 = &norm(p + "post_attention_layernorm", d, true, false);
      L.gate = &linear(p + "mlp.gate_proj", d, c.intermediate, c.mlp_bias);
      L.up = &linear(p + "mlp.up_proj", d, c.intermediate, c.mlp_bias);
      L.down = &linear(p + "mlp.down_proj", c.intermediate, d, c.mlp_bias);
      feeds(*L.ln1, {L.q, L.k, L.v});
      feeds(*L.ln2, {L.gate, L.up});
      layers_.push_back(L);
    }
    final_ = &norm("model.norm", d, true, false);
    if (job_.task == spec::Task::kSequenceClassification) {
      score_ = &linear("score", d, c.num_labels, false, false, false, true);
    } else if (!c.tie_word_embeddings) {
      head_ = &linear("lm_head", d, c.vocab_size, false, false, false);
      feeds(*final_, {head_});
    }
  }

  Tensor forward(const Batch& b, bool training) override {
    const int64_t B = b.B, S = b.S, T = B * S, d = cfg_.hidden, H = cfg_.heads, Hk = cfg_.kv_heads,
                  D = cfg_.head_dim();
    s_.set_where("embeddings");
    Tensor x = embedding(s_, p("model.embed_tokens.weight"), b.ids, T, d);
    // RoPE tables: inv (float64 steps, then fp32), angles, cos/sin in the model's dtype.
    Tensor inv;
    {
      Tensor a = s_.empty(D / 2, 8), n = s_.empty(D / 2, 8), q = s_.empty(D / 2, 8);
      a = Tensor{};
      Tensor pw = s_.empty(D / 2, 8);
      inv = s_.empty(D / 2, kF32);
    }
    Tensor ang;
    {
      Tensor ar = s_.empty(S, kF32);
      ang = s_.empty(S * D / 2, kF32);
    }
    const Tensor emb = s_.empty(S * D, kF32);
    const Tensor cos = cast(s_, s_.empty(S * D, kF32), esize_);
    const Tensor sin = cast(s_, s_.empty(S * D, kF32), esize_);
    const AttnShape a{B, S, H, Hk, D, true, b.mask.defined()};
    const Tensor mask = b.mask;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer L = layers_[i];
      s_.set_where(layer_name(i));
      x = block([=](const Tensor& xin) {
        const Tensor h = apply_norm(*L.ln1, xin, T);
        const Tensor q = rope(s_, apply_linear(*L.q, h, T, training), cos, sin);
        const Tensor k = rope(s_, apply_linear(*L.k, h, T, training), cos, sin);
        const Tensor v = apply_linear(*L.v, h, T, training);
        const Tensor x1 = add(s_, xin, apply_linear(*L.o, attend(q, k, v, a, mask), T, training));
        const Tensor h2 = apply_norm(*L.ln2, x1, T);
        // GCC evaluates the arguments right to left: up, then gate.
        const Tensor u = apply_linear(*L.up, h2, T, training);
        const Tensor g = apply_linear(*L.gate, h2, T, training);
        return add(s_, x1, swiglu_tail(g, u, T, *L.down, training));
      }, x, training);
    }
    s_.set_where("head");
    const Tensor h = apply_norm(*final_, x, T);
    if (score_ != nullptr) {
      return classification_loss(apply_linear(*score_, last_token(h, b), B, training), B, cfg_.num_labels);
    }
    return lm_loss(h, b, head_, "model.embed_tokens.weight");
  }

 private:
  struct Layer {
    SimNorm *ln1, *ln2;
    SimLinear *q, *k, *v, *o, *gate, *up, *down;
  };
  std::vector<Layer> layers_;
  SimNorm* final_ = nullptr;
  SimLinear* head_ = nullptr;
  SimLinear* score_ = nullptr;
};

class Vit final : public SimModel {
 public:
  Vit(const Input& in, Sim& s, const Runtime& rt) : SimModel(in, s, rt) {
    const auto& c = cfg_;
    const int64_t d = c.hidden;
    param("vit.embeddings.cls_token", d);
    param("vit.embeddings.position_embeddings", c.max_positions * d);
    param("vit.embeddings.patch_embeddings.projection.weight", d * c.channels * c.patch_size * c.patch_size);
    param("vit.embeddings.patch_embeddings.projection.bias", d);
    for (int64_t i = 0; i < c.layers; ++i) {
      const std::string p = "vit.encoder.layer." + std::to_string(i) + ".";
      Layer L;
      L.ln1 = &norm(p + "layernorm_before", d, false, true);
      L.q = &linear(p + "attention.attention.query", d, d, c.qkv_bias);
      L.k = &linear(p + "attention.attention.key", d, d, c.qkv_bias);
      L.v = &linear(p + "attention.attention.value", d, d, c.qkv_bias);
      L.o = &linear(p + "attention.output.dense", d, d, true);
      L.ln2 = &norm(p + "layernorm_after", d, false, true);
      L.fc1 = &linear(p + "intermediate.dense", d, c.intermediate, true);
      L.fc2 = &linear(p + "output.dense", c.intermediate, d, true);
      feeds(*L.ln1, {L.q, L.k, L.v});
      feeds(*L.ln2, {L.fc1});
      layers_.push_back(L);
    }
    final_ = &norm("vit.layernorm", d, false, true);
    classifier_ = &linear("classifier", d, c.num_labels, true, false, false, true);
    feeds(*final_, {classifier_});
  }

  int64_t grad_held_bytes(const Tensor& t, int64_t micro_batch) const override {
    // One image: the cls token's .grad is a view of the [1, S, d] embeddings' gradient.
    const auto& c = cfg_;
    if (micro_batch == 1 && t.block == p("vit.embeddings.cls_token").block) {
      const int64_t np = (c.image_size / c.patch_size) * (c.image_size / c.patch_size);
      return s_.timeline.charge((np + 1) * c.hidden * esize_);
    }
    return SimModel::grad_held_bytes(t, micro_batch);
  }

  Tensor forward(const Batch& b, bool training) override {
    const auto& c = cfg_;
    const int64_t B = b.B, d = c.hidden, H = c.heads, D = c.head_dim();
    const int64_t np = (c.image_size / c.patch_size) * (c.image_size / c.patch_size), S = np + 1, T = B * S;
    s_.set_where("embeddings");
    Tensor patches;
    {
      const Tensor px = cast(s_, b.pixels, esize_);
      patches = patch_conv(s_, rt_, px, B, c.channels, c.image_size, c.patch_size, d,
                           p("vit.embeddings.patch_embeddings.projection.weight"),
                           p("vit.embeddings.patch_embeddings.projection.bias"));
    }
    if (!rt_.cuda) {
      // CPU: .flatten(2) of oneDNN's convolution output is a copy (the output is freed).
      Tensor flat = s_.empty(patches.numel, patches.esize);
      s_.record("flatten", {&patches}, {&flat}, {}, [](Grads& gr) { return Grads{gr[0]}; });
      patches = flat;
    }
    patches.contiguous = false;  // .transpose(1, 2)
    Tensor cls = p("vit.embeddings.cls_token");
    Tensor cls_b = cls.detach();
    cls_b.numel = B * d;
    s_.record("expand", {&cls}, {&cls_b}, {}, [this, d, B](Grads& g) {
      if (B > 1) return Grads{s_.empty(d, esize_)};  // summed over the batch
      // One image: the gradient is the [1, 1, d] slice of the embeddings' gradient, a
      // view .grad steals (size-1 dimensions obey the layout contract), keeping that
      // whole [1, S, d] gradient alive as the cls token's .grad.
      Tensor v = g[0];
      v.contiguous = true;
      v.sole_view = true;
      return Grads{v};
    });
    Tensor x = add(s_, cat2(s_, cls_b, patches), p("vit.embeddings.position_embeddings"));
    cls_b = Tensor{};
    const AttnShape a{B, S, H, H, D, false, false};
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer L = layers_[i];
      s_.set_where(layer_name(i));
      x = block([=](const Tensor& xin) {
        const Tensor h = apply_norm(*L.ln1, xin, T);
        const Tensor q = apply_linear(*L.q, h, T, training);
        const Tensor k = apply_linear(*L.k, h, T, training);
        const Tensor v = apply_linear(*L.v, h, T, training);
        const Tensor x1 = add(s_, xin, apply_linear(*L.o, attend(q, k, v, a, Tensor{}), T, training));
        const Tensor z = apply_linear(*L.fc1, apply_norm(*L.ln2, x1, T), T, training);
        return add(s_, x1, mlp_tail(z, T, *L.fc2, training));
      }, x, training);
    }
    s_.set_where("head");
    const Tensor cl = apply_norm(*final_, part(s_, x, B * d, false, true, "select"), B);
    return classification_loss(apply_linear(*classifier_, cl, B, training), B, c.num_labels);
  }

 private:
  struct Layer {
    SimNorm *ln1, *ln2;
    SimLinear *q, *k, *v, *o, *fc1, *fc2;
  };
  std::vector<Layer> layers_;
  SimNorm* final_ = nullptr;
  SimLinear* classifier_ = nullptr;
};

class Bert final : public SimModel {
 public:
  Bert(const Input& in, Sim& s, const Runtime& rt) : SimModel(in, s, rt) {
    const auto& c = cfg_;
    roberta_ = c.arch == spec::Architecture::kRoberta;
    base_ = roberta_ ? "roberta." : "bert.";
    const int64_t d = c.hidden;
    param(base_ + "embeddings.word_embeddings.weight", c.vocab_size * d);
    param(base_ + "embeddings.position_embeddings.weight", c.max_positions * d);
    if (c.type_vocab_size > 0) param(base_ + "embeddings.token_type_embeddings.weight", c.type_vocab_size * d);
    emb_norm_ = &norm(base_ + "embeddings.LayerNorm", d, false, true);
    SimNorm* prev = emb_norm_;
    for (int64_t i = 0; i < c.layers; ++i) {
      const std::string p = base_ + "encoder.layer." + std::to_string(i) + ".";
      Layer L;
      L.q = &linear(p + "attention.self.query", d, d, true);
      L.k = &linear(p + "attention.self.key", d, d, true);
      L.v = &linear(p + "attention.self.value", d, d, true);
      L.o = &linear(p + "attention.output.dense", d, d, true);
      L.ln1 = &norm(p + "attention.output.LayerNorm", d, false, true);
      L.fc1 = &linear(p + "intermediate.dense", d, c.intermediate, true);
      L.fc2 = &linear(p + "output.dense", c.intermediate, d, true);
      L.ln2 = &norm(p + "output.LayerNorm", d, false, true);
      feeds(*prev, {L.q, L.k, L.v});
      feeds(*L.ln1, {L.fc1});
      prev = L.ln2;
      layers_.push_back(L);
    }
    if (roberta_) {
      dense_ = &linear("classifier.dense", d, d, true, false, false, true);
      out_ = &linear("classifier.out_proj", d, c.num_labels, true, false, false, true);
    } else {
      dense_ = &linear(base_ + "pooler.dense", d, d, true, false, false);
      out_ = &linear("classifier", d, c.num_labels, true, false, false, true);
    }
  }

  Tensor forward(const Batch& b, bool training) override {
    const auto& c = cfg_;
    const int64_t B = b.B, S = b.S, T = B * S, d = c.hidden, H = c.heads, D = c.head_dim();
    s_.set_where("embeddings");
    Tensor pos, real;
    if (roberta_) {
      {
        Tensor ne = s_.empty(T, 1);
        real = s_.empty(T, 8);
      }
      Tensor cs = s_.empty(T, 8);
      Tensor m = s_.empty(T, 8);
      cs = Tensor{};
      pos = s_.empty(T, 8);
    } else {
      pos = s_.empty(S, 8);
    }
    { Tensor mx = s_.empty(1, 8); }
    Tensor e = add(s_, embedding(s_, p(base_ + "embeddings.word_embeddings.weight"), b.ids, T, d),
                   embedding(s_, p(base_ + "embeddings.position_embeddings.weight"), pos, T, d));
    if (c.type_vocab_size > 0) {
      const Tensor& tt = p(base_ + "embeddings.token_type_embeddings.weight");
      e = add(s_, e, part(s_, tt, d, true, true, "select"));
    }
    Tensor y = apply_norm(*emb_norm_, e, T);
    const AttnShape a{B, S, H, H, D, false, b.mask.defined()};
    const Tensor mask = b.mask;
    const SimNorm* prev = emb_norm_;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer L = layers_[i];
      s_.set_where(layer_name(i));
      y = block([=](const Tensor& yin) {
        const Tensor r = residual(*prev, yin);
        const Tensor q = apply_linear(*L.q, yin, T, training);
        const Tensor k = apply_linear(*L.k, yin, T, training);
        const Tensor v = apply_linear(*L.v, yin, T, training);
        const Tensor at = apply_linear(*L.o, attend(q, k, v, a, mask), T, training);
        const Tensor y1 = apply_norm(*L.ln1, add(s_, r, at), T);
        const Tensor m = mlp_tail(apply_linear(*L.fc1, y1, T, training), T, *L.fc2, training);
        return apply_norm(*L.ln2, add(s_, residual(*L.ln1, y1), m), T);
      }, y, training);
      prev = L.ln2;
    }
    s_.set_where("head");
    const Tensor r = residual(*prev, y);
    const Tensor cls = part(s_, r, B * d, false, true, "select");
    const Tensor logits = apply_linear(*out_, tanh(s_, apply_linear(*dense_, cls, B, training)), B, training);
    return classification_loss(logits, B, c.num_labels);
  }

 private:
  Tensor residual(const SimNorm& n, const Tensor& y) { return n.merged ? affine(s_, y, n.gamma, n.beta) : y; }

  struct Layer {
    SimLinear *q, *k, *v, *o, *fc1, *fc2;
    SimNorm *ln1, *ln2;
  };
  bool roberta_ = false;
  std::string base_;
  SimNorm* emb_norm_ = nullptr;
  std::vector<Layer> layers_;
  SimLinear* dense_ = nullptr;
  SimLinear* out_ = nullptr;
};

}  // namespace

std::unique_ptr<SimModel> SimModel::create(const Input& in, Sim& s, const Runtime& rt) {
  switch (in.job.architecture) {
    case spec::Architecture::kGPT2: return std::unique_ptr<SimModel>(new Gpt2(in, s, rt));
    case spec::Architecture::kLlama: return std::unique_ptr<SimModel>(new Llama(in, s, rt));
    case spec::Architecture::kViT: return std::unique_ptr<SimModel>(new Vit(in, s, rt));
    case spec::Architecture::kBert:
    case spec::Architecture::kRoberta: return std::unique_ptr<SimModel>(new Bert(in, s, rt));
  }
  throw EstimateError("architecture: not supported by the estimator");
}

}  // namespace memfit::estimator::sim
