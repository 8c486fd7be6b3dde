#include "reference_configs.h"

namespace memfit::estimator::reference {
namespace {

model::ModelConfig base(spec::Architecture a, int64_t d, int64_t layers, int64_t heads, int64_t intermediate) {
  model::ModelConfig c;
  c.arch = a;
  c.hidden = d;
  c.layers = layers;
  c.heads = heads;
  c.kv_heads = heads;
  c.intermediate = intermediate;
  return c;
}

}  // namespace

model::ModelConfig gpt2(int64_t hidden, int64_t layers, int64_t heads) {
  auto c = base(spec::Architecture::kGPT2, hidden, layers, heads, 4 * hidden);
  c.vocab_size = 50257;
  c.max_positions = 1024;
  c.activation = "gelu_new";
  return c;
}

model::ModelConfig llama(int64_t hidden, int64_t layers, int64_t heads, int64_t kv_heads, int64_t intermediate) {
  auto c = base(spec::Architecture::kLlama, hidden, layers, heads, intermediate);
  c.kv_heads = kv_heads;
  c.vocab_size = 32000;
  c.max_positions = 4096;
  c.activation = "silu";
  c.tie_word_embeddings = false;
  c.qkv_bias = false;
  c.mlp_bias = false;
  return c;
}

model::ModelConfig vit(int64_t hidden, int64_t layers, int64_t heads) {
  auto c = base(spec::Architecture::kViT, hidden, layers, heads, 4 * hidden);
  c.image_size = 224;
  c.patch_size = 16;
  c.channels = 3;
  c.max_positions = 197;
  c.activation = "gelu";
  c.num_labels = 100;
  return c;
}

model::ModelConfig roberta(int64_t hidden, int64_t layers, int64_t heads) {
  auto c = base(spec::Architecture::kRoberta, hidden, layers, heads, 4 * hidden);
  c.vocab_size = 50265;
  c.max_positions = 514;
  c.type_vocab_size = 1;
  c.pad_token_id = 1;
  c.activation = "gelu";
  c.num_labels = 2;
  return c;
}

}  // namespace memfit::estimator::reference
