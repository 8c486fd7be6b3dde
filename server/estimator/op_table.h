// The estimator's per-op table: for every op the worker's models run, what it allocates
// in forward, what it keeps for backward, and what its backward allocates, in the same
// order as the real op (worker/ops/functions/*.cpp and the LibTorch ops the models use).
// tests/ops/test_estimator_ops.cpp runs each real op under the tracking allocator next
// to its entry here and requires the same bytes kept and the same peaks.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "sim.h"

namespace memfit::estimator::sim {

// What differs between LibTorch builds and devices.
struct Runtime {
  bool cuda = false;
  int threads = 1;                        // CPU compute threads
  bool mean_backward_keeps_input = true;  // LibTorch 1.13: mean.dim's node keeps its input
  int64_t attention_chunk_bytes = 16 << 20;
  int64_t loss_chunk_bytes = 32 << 20;
};

// memfit::ops::LinearWeights: which tensors exist and which train.
struct LinearW {
  int64_t in = 0, out = 0, rank = 0;
  Tensor weight, bias, lora_a, lora_b;
  bool in_scale = false, in_shift = false;  // the merged norm's gamma / beta feed LoRA
  double lora_dropout = 0.0;
  bool has_lora() const { return lora_a.defined(); }
  bool needs_input() const {
    return weight.requires_grad() || (has_lora() && (lora_a.requires_grad() || lora_b.requires_grad()));
  }
};

enum class Act { kGELU, kGELUTanh, kSiLU, kReLU };

// x has rows * w.in elements. `name` labels the breakdown.
Tensor linear(Sim& s, const Tensor& x, int64_t rows, const LinearW& w, bool training, const std::string& name);
Tensor act_linear(Sim& s, const Tensor& z, int64_t rows, const LinearW& down, bool training, const std::string& name);
Tensor swiglu_linear(Sim& s, const Tensor& g, const Tensor& u, int64_t rows, const LinearW& down, bool training,
                     const std::string& name);
Tensor approx_act(Sim& s, const Tensor& x, const std::string& name);
Tensor stock_act(Sim& s, const Tensor& x, Act act);
Tensor ms_norm(Sim& s, const Tensor& x, int64_t rows, const std::string& name);
Tensor layer_norm(Sim& s, const Runtime& rt, const Tensor& x, int64_t rows, const Tensor& gamma, const Tensor& beta);
Tensor rms_norm_composite(Sim& s, const Runtime& rt, const Tensor& x, int64_t rows, const Tensor& gamma);
// y * gamma (+ beta): a norm's affine applied explicitly.
Tensor affine(Sim& s, const Tensor& y, const Tensor& gamma, const Tensor& beta);
// a + b; b may be smaller (broadcast over leading dimensions).
Tensor add(Sim& s, const Tensor& a, const Tensor& b);
// a * b, same numel; the product the LLaMA exact SwiGLU forms.
Tensor mul(Sim& s, const Tensor& a, const Tensor& b);
Tensor tanh(Sim& s, const Tensor& x);
Tensor embedding(Sim& s, const Tensor& weight, const Tensor& ids, int64_t rows, int64_t d);
// A view of part of `base` (narrow, select): no bytes in forward; backward allocates a
// zero tensor of the base's size and copies the gradient in. `viewable`: whether
// flattening it to 2-D is still a view (a row select is, a narrow of the middle
// dimension of a batch is not).
Tensor part(Sim& s, const Tensor& base, int64_t numel, bool contiguous, bool viewable, const std::string& op);
// A contiguous copy of a non-contiguous view (reshape); gradient passes through.
Tensor contiguous_copy(Sim& s, const Tensor& x);
// dtype cast (x.to(dtype)) when the element size changes.
Tensor cast(Sim& s, const Tensor& x, int64_t esize);

struct AttnShape {
  int64_t B = 0, S = 0, H = 0, Hk = 0, D = 0;
  bool causal = false;
  bool key_mask = false;
};
// memfit::ops::attention; q [B, S, H, D], k, v [B, S, Hk, D]. Returns [B, S, H * D].
Tensor attention(Sim& s, const Runtime& rt, const Tensor& q, const Tensor& k, const Tensor& v,
                 const Tensor& key_mask, const AttnShape& a);
// The softmax composite Hugging Face's eager attention computes.
Tensor stock_attention(Sim& s, const Tensor& q, const Tensor& k, const Tensor& v, const AttnShape& a,
                       bool q_contiguous);
// RoPE composite t * cos + rotate_half(t) * sin on t [B, S, heads, D].
Tensor rope(Sim& s, const Tensor& t, const Tensor& cos, const Tensor& sin);

// at::linear(x, W) with no bias (the tied LM head): matmul folds [B, S', d] to 2-D,
// copying when x is a non-contiguous view.
Tensor stock_linear(Sim& s, const Tensor& x, int64_t rows, int64_t in, int64_t out, const Tensor& weight);
// causal_lm_loss: log-softmax + NLL over [rows, V] logits (cast to fp32 first).
Tensor cross_entropy(Sim& s, const Tensor& logits, int64_t rows, int64_t classes);
// memfit::ops::linear_cross_entropy over h [rows, d] and weight [V, d].
Tensor linear_cross_entropy(Sim& s, const Runtime& rt, const Tensor& h, int64_t rows, int64_t d, int64_t vocab,
                            const Tensor& weight);
// ViT's patch embedding: conv2d with stride = kernel on images [B, C, H, W].
Tensor patch_conv(Sim& s, const Runtime& rt, const Tensor& pixels, int64_t B, int64_t C, int64_t image, int64_t patch,
                  int64_t d, const Tensor& weight, const Tensor& bias);
Tensor cat2(Sim& s, const Tensor& a, const Tensor& b);

// Activation checkpointing (CheckpointFn): keeps x (and on CPU the generator state),
// runs fn without recording, and in backward runs it again and back-propagates.
Tensor checkpoint(Sim& s, const Runtime& rt, const Tensor& x, const Tensor& anchor,
                  const std::function<Tensor(const Tensor&)>& fn);

}  // namespace memfit::estimator::sim
