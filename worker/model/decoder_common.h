// Pieces shared by the decoder models (GPT-2, LLaMA).
#pragma once

#include <ATen/ATen.h>

#include "model.h"

namespace memfit::model {

// Sequence classification on a decoder: logits at each sequence's last real token
// (Hugging Face's *ForSequenceClassification convention).
inline at::Tensor last_token(const at::Tensor& h, const at::Tensor& attention_mask) {
  const int64_t B = h.size(0), S = h.size(1);
  at::Tensor last = attention_mask.defined()
                        ? attention_mask.to(at::kLong).sum(1).sub(1).clamp_min(0)
                        : at::full({B}, S - 1, at::TensorOptions().dtype(at::kLong).device(h.device()));
  return h.index({at::arange(B, last.options()), last});
}

}  // namespace memfit::model
