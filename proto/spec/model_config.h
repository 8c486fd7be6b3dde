// Model dimensions from a Hugging Face config.json, validated (errors name the file and
// the key). No LibTorch, no protobuf: the worker and the memory estimator read the same
// struct.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "job.h"

namespace memfit::model {

class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct ModelConfig {
  spec::Architecture arch = spec::Architecture::kGPT2;
  int64_t vocab_size = 0;
  int64_t hidden = 0;             // d
  int64_t layers = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;           // == heads unless grouped-query attention
  int64_t intermediate = 0;       // MLP width
  int64_t max_positions = 0;
  double norm_eps = 1e-5;
  std::string activation;         // "gelu", "gelu_new" (tanh), "silu", "relu"
  bool tie_word_embeddings = true;
  double rope_theta = 10000.0;    // LLaMA
  bool qkv_bias = true;           // ViT, BERT; LLaMA: attention_bias
  bool mlp_bias = true;
  int64_t type_vocab_size = 0;    // BERT token types
  int64_t pad_token_id = 0;       // RoBERTa position offset
  int64_t image_size = 0, patch_size = 0, channels = 3;  // ViT
  int64_t num_labels = 0;         // classification heads
  int64_t head_dim() const { return hidden / heads; }
};

// Reads config.json for the given architecture. num_labels_hint (> 0) overrides the
// config's label count (id2label / num_labels) for classification tasks.
// The file is opened through fsx::open_input (beneath the worker's input roots, if set).
ModelConfig load_config(const std::string& path, spec::Architecture arch, int64_t num_labels_hint = 0);
// The same from the file's text; `origin` names it in errors. Errors never quote the text.
ModelConfig parse_config(const std::string& text, const std::string& origin, spec::Architecture arch,
                         int64_t num_labels_hint = 0);

}  // namespace memfit::model
