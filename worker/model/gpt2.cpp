// GPT-2 (Hugging Face GPT2LMHeadModel / GPT2ForSequenceClassification layout): learned
// positions, pre-LN blocks with a fused qkv Conv1D, GELU (tanh) MLP, head tied to wte.
#include <ATen/ATen.h>

#include "decoder_common.h"
#include "model.h"

namespace memfit::model {
namespace {

class Gpt2 final : public Model {
 public:
  Gpt2(const spec::Job& job, const ModelConfig& c) : Model(job, c) {
    const int64_t d = c.hidden;
    param("transformer.wte.weight", {c.vocab_size, d}, 0.02);
    param("transformer.wpe.weight", {c.max_positions, d}, 0.01);
    for (int64_t i = 0; i < c.layers; ++i) {
      const std::string p = "transformer.h." + std::to_string(i) + ".";
      Layer L;
      L.ln1 = &norm(p + "ln_1", d, false, true);
      L.attn = &linear(p + "attn.c_attn", d, 3 * d, true, /*conv1d=*/true);
      L.proj = &linear(p + "attn.c_proj", d, d, true, true);
      L.ln2 = &norm(p + "ln_2", d, false, true);
      L.fc = &linear(p + "mlp.c_fc", d, c.intermediate, true, true);
      L.fc_proj = &linear(p + "mlp.c_proj", c.intermediate, d, true, true);
      feeds(*L.ln1, {L.attn});
      feeds(*L.ln2, {L.fc});
      layers_.push_back(L);
    }
    ln_f_ = &norm("transformer.ln_f", d, false, true);
    if (job.task == spec::Task::kSequenceClassification) {
      if (c.num_labels <= 0) throw ConfigError(job.config_path + ": num_labels/id2label needed for classification");
      score_ = &linear("score", d, c.num_labels, false, false, false, /*is_head=*/true);
    } else if (!c.tie_word_embeddings) {
      head_lin_ = &linear("lm_head", d, c.vocab_size, false, false, false);
    }
  }

  Output forward(const Batch& b, bool training) override {
    begin_forward();
    const int64_t B = b.input_ids.size(0), S = b.input_ids.size(1);
    if (S > cfg_.max_positions) {
      throw spec::SpecError("training.sequence_length: " + std::to_string(S) + " exceeds the model's n_positions " +
                            std::to_string(cfg_.max_positions));
    }
    const at::Tensor pos = at::arange(S, b.input_ids.options());
    at::Tensor x = at::embedding(params_.at("transformer.wte.weight"), b.input_ids) +
                   at::embedding(params_.at("transformer.wpe.weight"), pos);
    const int64_t H = cfg_.heads, D = cfg_.head_dim(), d = cfg_.hidden;
    const at::Tensor key_mask = b.attention_mask;
    for (const Layer& L : layers_) {
      x = block([=](const at::Tensor& xin) {
        const at::Tensor qkv = apply_linear(*L.attn, apply_norm(*L.ln1, xin), training).view({B, S, 3, H, D});
        const at::Tensor a = attend(qkv.select(2, 0), qkv.select(2, 1), qkv.select(2, 2), true, key_mask);
        const at::Tensor x1 = xin + apply_linear(*L.proj, a, training);
        const at::Tensor z = apply_linear(*L.fc, apply_norm(*L.ln2, x1), training);
        return x1 + mlp_tail(z, *L.fc_proj, training);
      }, x, training);
    }
    (void)d;
    const at::Tensor h = apply_norm(*ln_f_, x);
    if (score_ != nullptr) {
      return classification_loss(apply_linear(*score_, last_token(h, b.attention_mask), training), b.labels, training, keep_logits_);
    }
    if (fused_loss_ok(head_lin_)) {
      return fused_causal_lm_loss(h, head_lin_ ? head_lin_->weight : params_.at("transformer.wte.weight"), b.labels);
    }
    // Training and evaluation need no logits for the last position.
    const at::Tensor hl = keep_logits_ ? h : h.narrow(1, 0, h.size(1) - 1);
    const at::Tensor logits = head_lin_ ? apply_linear(*head_lin_, hl, training)
                                     : at::linear(hl, params_.at("transformer.wte.weight"));
    return causal_lm_loss(logits, b.labels, training, keep_logits_);
  }

 private:
  struct Layer {
    Norm *ln1, *ln2;
    Linear *attn, *proj, *fc, *fc_proj;
  };
  std::vector<Layer> layers_;
  Norm* ln_f_ = nullptr;
  Linear* score_ = nullptr;
  Linear* head_lin_ = nullptr;
};

}  // namespace

std::unique_ptr<Model> make_gpt2(const spec::Job& job, const ModelConfig& cfg) {
  return std::make_unique<Gpt2>(job, cfg);
}

}  // namespace memfit::model
