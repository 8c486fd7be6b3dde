// LLaMA (Hugging Face LlamaForCausalLM layout): RMSNorm, RoPE, grouped-query attention,
// SwiGLU MLP, tied or untied head.
#include <ATen/ATen.h>

#include "decoder_common.h"
#include "model.h"

namespace memfit::model {
namespace {

class Llama final : public Model {
 public:
  Llama(const spec::Job& job, const ModelConfig& c) : Model(job, c) {
    const int64_t d = c.hidden, D = c.head_dim();
    param("model.embed_tokens.weight", {c.vocab_size, d}, 0.02);
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
    if (job.task == spec::Task::kSequenceClassification) {
      if (c.num_labels <= 0) throw ConfigError(job.config_path + ": num_labels/id2label needed for classification");
      score_ = &linear("score", d, c.num_labels, false, false, false, /*is_head=*/true);
    } else if (!c.tie_word_embeddings) {
      lm_head_ = &linear("lm_head", d, c.vocab_size, false, false, false);
      feeds(*final_, {lm_head_});
    }
  }

  Output forward(const Batch& b, bool training) override {
    begin_forward();
    const int64_t B = b.input_ids.size(0), S = b.input_ids.size(1);
    const int64_t H = cfg_.heads, Hk = cfg_.kv_heads, D = cfg_.head_dim();
    at::Tensor x = at::embedding(params_.at("model.embed_tokens.weight"), b.input_ids);
    // RoPE tables, computed in fp32 as Hugging Face does, then cast.
    const auto f64 = at::TensorOptions().dtype(at::kDouble).device(x.device());
    const at::Tensor inv = at::pow(cfg_.rope_theta, -at::arange(0, D, 2, f64) / static_cast<double>(D)).to(at::kFloat);
    const at::Tensor ang = at::outer(at::arange(S, inv.options()), inv);
    const at::Tensor emb = at::cat({ang, ang}, -1);
    const at::Tensor cos = emb.cos().to(x.scalar_type()).view({S, 1, D});
    const at::Tensor sin = emb.sin().to(x.scalar_type()).view({S, 1, D});
    auto rope = [=](const at::Tensor& t) {
      const int64_t half = D / 2;
      const at::Tensor rot = at::cat({-t.narrow(-1, half, half), t.narrow(-1, 0, half)}, -1);
      return t * cos + rot * sin;
    };
    const at::Tensor key_mask = b.attention_mask;
    for (const Layer& L : layers_) {
      x = block([=](const at::Tensor& xin) {
        const at::Tensor h = apply_norm(*L.ln1, xin);
        const at::Tensor q = rope(apply_linear(*L.q, h, training).view({B, S, H, D}));
        const at::Tensor k = rope(apply_linear(*L.k, h, training).view({B, S, Hk, D}));
        const at::Tensor v = apply_linear(*L.v, h, training).view({B, S, Hk, D});
        const at::Tensor x1 = xin + apply_linear(*L.o, attend(q, k, v, true, key_mask), training);
        const at::Tensor h2 = apply_norm(*L.ln2, x1);
        return x1 + swiglu_tail(apply_linear(*L.gate, h2, training), apply_linear(*L.up, h2, training),
                                *L.down, training);
      }, x, training);
    }
    const at::Tensor h = apply_norm(*final_, x);
    if (score_ != nullptr) {
      return classification_loss(apply_linear(*score_, last_token(h, b.attention_mask), training), b.labels, training, keep_logits_);
    }
    if (fused_loss_ok(lm_head_)) {
      return fused_causal_lm_loss(h, lm_head_ ? lm_head_->weight : params_.at("model.embed_tokens.weight"), b.labels);
    }
    // Training and evaluation need no logits for the last position.
    const at::Tensor hl = keep_logits_ ? h : h.narrow(1, 0, h.size(1) - 1);
    const at::Tensor logits = lm_head_ ? apply_linear(*lm_head_, hl, training)
                                     : at::linear(hl, params_.at("model.embed_tokens.weight"));
    return causal_lm_loss(logits, b.labels, training, keep_logits_);
  }

 private:
  struct Layer {
    Norm *ln1, *ln2;
    Linear *q, *k, *v, *o, *gate, *up, *down;
  };
  std::vector<Layer> layers_;
  Norm* final_ = nullptr;
  Linear* lm_head_ = nullptr;
  Linear* score_ = nullptr;
};

}  // namespace

std::unique_ptr<Model> make_llama(const spec::Job& job, const ModelConfig& cfg) {
  return std::make_unique<Llama>(job, cfg);
}

}  // namespace memfit::model
