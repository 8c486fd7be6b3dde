// ViT (Hugging Face ViTForImageClassification layout): patch embedding, [CLS] token,
// learned positions, pre-LN blocks, GELU MLP, classifier on [CLS].
#include <ATen/ATen.h>

#include "model.h"

namespace memfit::model {
namespace {

class Vit final : public Model {
 public:
  Vit(const spec::Job& job, const ModelConfig& c) : Model(job, c) {
    const int64_t d = c.hidden, n = c.max_positions;
    if (c.num_labels <= 0) throw ConfigError(job.config_path + ": num_labels/id2label needed for classification");
    param("vit.embeddings.cls_token", {1, 1, d}, 0.02);
    param("vit.embeddings.position_embeddings", {1, n, d}, 0.02);
    param("vit.embeddings.patch_embeddings.projection.weight", {d, c.channels, c.patch_size, c.patch_size}, 0.02);
    zeros("vit.embeddings.patch_embeddings.projection.bias", {d});
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
    classifier_ = &linear("classifier", d, c.num_labels, true, false, false, /*is_head=*/true);
    feeds(*final_, {classifier_});
  }

  Output forward(const Batch& b, bool training) override {
    begin_forward();
    const at::Tensor& px = b.pixels;
    const int64_t B = px.size(0), d = cfg_.hidden, H = cfg_.heads, D = cfg_.head_dim();
    if (px.dim() != 4 || px.size(1) != cfg_.channels || px.size(2) != cfg_.image_size || px.size(3) != cfg_.image_size) {
      throw spec::SpecError("data: images are " + std::to_string(px.size(1)) + "x" + std::to_string(px.size(2)) + "x" +
                            std::to_string(px.size(3)) + " but the model expects " + std::to_string(cfg_.channels) +
                            "x" + std::to_string(cfg_.image_size) + "x" + std::to_string(cfg_.image_size));
    }
    const at::Tensor patches = at::conv2d(px.to(params_.at("vit.embeddings.cls_token").scalar_type()),
                                          params_.at("vit.embeddings.patch_embeddings.projection.weight"),
                                          params_.at("vit.embeddings.patch_embeddings.projection.bias"),
                                          {cfg_.patch_size, cfg_.patch_size})
                                   .flatten(2)
                                   .transpose(1, 2);  // [B, N, d]
    at::Tensor x = at::cat({params_.at("vit.embeddings.cls_token").expand({B, 1, d}), patches}, 1) +
                   params_.at("vit.embeddings.position_embeddings");
    const int64_t S = x.size(1);
    for (const Layer& L : layers_) {
      x = block([=](const at::Tensor& xin) {
        const at::Tensor h = apply_norm(*L.ln1, xin);
        const at::Tensor q = apply_linear(*L.q, h, training).view({B, S, H, D});
        const at::Tensor k = apply_linear(*L.k, h, training).view({B, S, H, D});
        const at::Tensor v = apply_linear(*L.v, h, training).view({B, S, H, D});
        const at::Tensor x1 = xin + apply_linear(*L.o, attend(q, k, v, false, at::Tensor()), training);
        const at::Tensor z = apply_linear(*L.fc1, apply_norm(*L.ln2, x1), training);
        return x1 + mlp_tail(z, *L.fc2, training);
      }, x, training);
    }
    // The final norm is per token: normalising only [CLS] gives the same logits and
    // keeps one row per image instead of every token.
    const at::Tensor cls = apply_norm(*final_, x.select(1, 0));
    return classification_loss(apply_linear(*classifier_, cls, training), b.labels, training, keep_logits_);
  }

 private:
  struct Layer {
    Norm *ln1, *ln2;
    Linear *q, *k, *v, *o, *fc1, *fc2;
  };
  std::vector<Layer> layers_;
  Norm* final_ = nullptr;
  Linear* classifier_ = nullptr;
};

}  // namespace

std::unique_ptr<Model> make_vit(const spec::Job& job, const ModelConfig& cfg) {
  return std::make_unique<Vit>(job, cfg);
}

}  // namespace memfit::model
