// BERT and RoBERTa for sequence classification (Hugging Face layouts): post-LN encoder.
// With memory-sharing norms a norm's output feeds the next linears (affine merged) and
// the residual path, which re-applies gamma * y + beta explicitly.
#include <ATen/ATen.h>

#include "model.h"

namespace memfit::model {
namespace {

class Bert final : public Model {
 public:
  Bert(const spec::Job& job, const ModelConfig& c) : Model(job, c) {
    roberta_ = c.arch == spec::Architecture::kRoberta;
    const std::string base = roberta_ ? "roberta." : "bert.";
    const int64_t d = c.hidden;
    if (c.num_labels <= 0) throw ConfigError(job.config_path + ": num_labels/id2label needed for classification");
    param(base + "embeddings.word_embeddings.weight", {c.vocab_size, d}, 0.02);
    param(base + "embeddings.position_embeddings.weight", {c.max_positions, d}, 0.02);
    if (c.type_vocab_size > 0) param(base + "embeddings.token_type_embeddings.weight", {c.type_vocab_size, d}, 0.02);
    emb_norm_ = &norm(base + "embeddings.LayerNorm", d, false, true);
    Norm* prev = emb_norm_;
    for (int64_t i = 0; i < c.layers; ++i) {
      const std::string p = base + "encoder.layer." + std::to_string(i) + ".";
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
      head_dense_ = &linear("classifier.dense", d, d, true, false, false, /*is_head=*/true);
      head_out_ = &linear("classifier.out_proj", d, c.num_labels, true, false, false, true);
    } else {
      pooler_ = &linear(base + "pooler.dense", d, d, true, false, false);
      head_out_ = &linear("classifier", d, c.num_labels, true, false, false, true);
    }
  }

  Output forward(const Batch& b, bool training) override {
    begin_forward();
    const std::string base = roberta_ ? "roberta." : "bert.";
    const int64_t B = b.input_ids.size(0), S = b.input_ids.size(1), H = cfg_.heads, D = cfg_.head_dim();
    at::Tensor pos;
    if (roberta_) {
      // RoBERTa numbers real tokens from padding_idx + 1.
      const at::Tensor real = b.input_ids.ne(cfg_.pad_token_id).to(at::kLong);
      pos = real.cumsum(1).mul(real).add(cfg_.pad_token_id);
    } else {
      pos = at::arange(S, b.input_ids.options()).unsqueeze(0).expand({B, S});
    }
    if (pos.max().item<int64_t>() >= cfg_.max_positions) {
      throw spec::SpecError("training.sequence_length: " + std::to_string(S) +
                            " exceeds the model's max_position_embeddings " + std::to_string(cfg_.max_positions));
    }
    at::Tensor e = at::embedding(params_.at(base + "embeddings.word_embeddings.weight"), b.input_ids) +
                   at::embedding(params_.at(base + "embeddings.position_embeddings.weight"), pos);
    const auto tt = params_.find(base + "embeddings.token_type_embeddings.weight");
    if (tt != params_.end()) e = e + tt->second[0];
    // y is a norm's output: what the next linears read. The residual is y itself, or
    // gamma * y + beta when the norm's affine is merged into those linears; so y alone
    // carries a layer's state, and a layer can be one checkpointed block.
    at::Tensor y = apply_norm(*emb_norm_, e);
    const at::Tensor mask = b.attention_mask;
    const Norm* prev = emb_norm_;
    for (const Layer& L : layers_) {
      y = block([=](const at::Tensor& yin) {
        const at::Tensor r = residual(*prev, yin);
        const at::Tensor q = apply_linear(*L.q, yin, training).view({B, S, H, D});
        const at::Tensor k = apply_linear(*L.k, yin, training).view({B, S, H, D});
        const at::Tensor v = apply_linear(*L.v, yin, training).view({B, S, H, D});
        const at::Tensor a = apply_linear(*L.o, attend(q, k, v, false, mask), training);
        const at::Tensor y1 = apply_norm(*L.ln1, r + a);
        const at::Tensor m = mlp_tail(apply_linear(*L.fc1, y1, training), *L.fc2, training);
        return apply_norm(*L.ln2, residual(*L.ln1, y1) + m);
      }, y, training);
      prev = L.ln2;
    }
    const at::Tensor r = residual(*prev, y);
    const at::Tensor cls = r.select(1, 0);
    at::Tensor logits;
    if (roberta_) {
      logits = apply_linear(*head_out_, at::tanh(apply_linear(*head_dense_, cls, training)), training);
    } else {
      logits = apply_linear(*head_out_, at::tanh(apply_linear(*pooler_, cls, training)), training);
    }
    return classification_loss(logits, b.labels, training, keep_logits_);
  }

 private:
  at::Tensor residual(const Norm& n, const at::Tensor& y) const { return n.merged ? affine(n, y) : y; }

  struct Layer {
    Linear *q, *k, *v, *o, *fc1, *fc2;
    Norm *ln1, *ln2;
  };
  bool roberta_ = false;
  Norm* emb_norm_ = nullptr;
  std::vector<Layer> layers_;
  Linear* pooler_ = nullptr;
  Linear* head_dense_ = nullptr;
  Linear* head_out_ = nullptr;
};

}  // namespace

std::unique_ptr<Model> make_bert(const spec::Job& job, const ModelConfig& cfg) {
  return std::make_unique<Bert>(job, cfg);
}

}  // namespace memfit::model
