// Hugging Face configurations of the published model families at real sizes, as
// model::ModelConfig (what config.json would say), for the estimator's benchmarks and
// tests: GPT-2, LLaMA, ViT (224x224, patch 16, RGB) and RoBERTa.
#pragma once

#include <cstdint>

#include "model_config.h"

namespace memfit::estimator::reference {

// GPT-2: vocabulary 50257, 1024 positions, gelu_new, MLP 4d.
model::ModelConfig gpt2(int64_t hidden, int64_t layers, int64_t heads);
// LLaMA: vocabulary 32000, 4096 positions, SiLU, untied head, no biases.
model::ModelConfig llama(int64_t hidden, int64_t layers, int64_t heads, int64_t kv_heads, int64_t intermediate);
// ViT for 224x224 RGB, patch 16 (196 patches + CLS), GELU, MLP 4d, 100 classes.
model::ModelConfig vit(int64_t hidden, int64_t layers, int64_t heads);
// RoBERTa: vocabulary 50265, 514 positions, one token type, pad id 1, GELU, MLP 4d,
// 2 classes.
model::ModelConfig roberta(int64_t hidden, int64_t layers, int64_t heads);

}  // namespace memfit::estimator::reference
