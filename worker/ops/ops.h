// memfit's memory-efficient training ops (shared/docs/method.md), as differentiable
// LibTorch functions. Each op's doc says exactly what it keeps for backward; the memory
// estimator mirrors these rules byte for byte.
//
//   #include "ops.h"
//   auto y  = memfit::ops::ms_layer_norm(x);                  // keeps y + rstd
//   auto h  = memfit::ops::linear(y, {fc1_w, fc1_b}, true);   // frozen: keeps nothing
//   auto a  = memfit::ops::regelu2(h);                         // keeps 2 bits/element
//
// All ops take float32, bfloat16 or float16 tensors of any shape (non-contiguous inputs
// are read through a contiguous copy), compute in fp32, and accept empty tensors. Wrong
// input raises a c10::Error that names the op and the problem.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <utility>

namespace memfit::ops {

// ---- Approx-BP activations -------------------------------------------------------
// Exact GELU (erf form) / SiLU forward; keeps ceil(numel / 4) bytes of 2-bit flags;
// backward is dy * s[flag] (kernels/approx_act.h).
at::Tensor regelu2(const at::Tensor& x);
at::Tensor resilu2(const at::Tensor& x);
// ReGELU2 whose forward is the tanh approximation of GELU (GPT-2's "gelu_new"); the same
// flags and backward as regelu2.
at::Tensor regelu2_tanh(const at::Tensor& x);

// ---- MS-BP normalization (no affine; over the last dimension) ----------------------
// Keeps its output y (which the next layer can keep too, at no extra cost) and one fp32
// rstd per row. Exact gradient.
at::Tensor ms_layer_norm(const at::Tensor& x, double eps = 1e-5);
at::Tensor ms_rms_norm(const at::Tensor& x, double eps = 1e-6);

// ---- Linear layers ----------------------------------------------------------------
// Weights of one linear layer y = x W^T + b, with an optional LoRA branch
//   y += lora_scale * dropout(x * lora_in_scale + lora_in_shift) A^T B^T.
// lora_in_scale/lora_in_shift (optional, [in]) let the LoRA branch see the original
// input of a layer whose preceding norm affine was merged into W (see norm_merge.h).
struct LinearWeights {
  at::Tensor weight;         // [out, in]
  at::Tensor bias;           // [out] or undefined
  at::Tensor lora_a;         // [r, in] or undefined (no LoRA)
  at::Tensor lora_b;         // [out, r]
  double lora_scale = 1.0;   // alpha / r
  double lora_dropout = 0.0; // in [0, 1)
  at::Tensor lora_in_scale;  // [in] or undefined
  at::Tensor lora_in_shift;  // [in] or undefined

  // A layer without LoRA (frozen unless weight requires grad).
  static LinearWeights plain(at::Tensor weight, at::Tensor bias = {}) {
    LinearWeights w;
    w.weight = std::move(weight);
    w.bias = std::move(bias);
    return w;
  }
  // A layer with a LoRA branch.
  static LinearWeights lora(at::Tensor weight, at::Tensor bias, at::Tensor a, at::Tensor b,
                            double scale, double dropout = 0.0) {
    LinearWeights w = plain(std::move(weight), std::move(bias));
    w.lora_a = std::move(a);
    w.lora_b = std::move(b);
    w.lora_scale = scale;
    w.lora_dropout = dropout;
    return w;
  }
};

// Memory-sharing linear (with optional LoRA). Keeps the very tensor x it was given
// (no copy, no cast) if and only if W or the LoRA factors need a gradient; a frozen
// layer without LoRA keeps nothing. With LoRA dropout in training it also keeps a
// 1-bit mask (ceil(numel(x) / 8) bytes) and recomputes dropout(x) in backward, so the
// kept x is still shared with the layer before.
at::Tensor linear(const at::Tensor& x, const LinearWeights& w, bool training);

// ---- Fused MLP tails (beyond the paper) ------------------------------------------
enum class MlpAct { kGELU, kSiLU, kGELUTanh };
// down(act(z)) with exact act; keeps z only (plus a LoRA dropout mask) and recomputes
// act(z) in backward. Use it when the down projection needs its input anyway.
at::Tensor act_linear(MlpAct act, const at::Tensor& z, const LinearWeights& down, bool training);
// down(silu(g) * u); keeps g and u only and recomputes silu(g) and the product in
// backward, with the exact SiLU derivative.
at::Tensor swiglu_linear(const at::Tensor& g, const at::Tensor& u, const LinearWeights& down,
                         bool training);

// ---- Dropout ---------------------------------------------------------------------
// Keeps a 1-bit mask (ceil(numel / 8) bytes). Identity (and keeps nothing) when
// !training or p == 0. The mask's seed comes from ATen's default CPU generator. Kept
// elements are scaled by fl32(1 / (1 - p)) (p as given, in double), forward and
// backward alike; so is LoRA dropout inside linear, and its replay in backward.
at::Tensor dropout(const at::Tensor& x, double p, bool training);

// ---- Loss over a large vocabulary (beyond the paper) -----------------------------
// Mean cross-entropy of the logits h W^T (+ bias) against labels (-100 = ignored),
// without ever holding the [T, V] logits: rows go through in chunks whose logits stay
// under chunk_bytes, and when grad mode is on the gradient is formed in the same pass
// (softmax - one-hot, times 1 / count), so backward only scales it by the incoming
// gradient. Keeps dL/dh ([T, d] in h's dtype) and, when W needs a gradient, dL/dW
// ([V, d] fp32, the size of W's gradient anyway); not the inputs, not the logits.
// h: [T, d]; weight: [V, d]; labels: [T] int64.
// bf16 on CUDA, the products run in bf16 (fp32 accumulation) and only the logits block
// is fp32; elsewhere every product is fp32.
at::Tensor linear_cross_entropy(const at::Tensor& h, const at::Tensor& weight,
                                const at::Tensor& labels, int64_t chunk_bytes = 32 << 20);
namespace detail {
// Tests: run the CUDA path's low-precision products on the CPU too.
void low_precision_loss_products_everywhere(bool on);
}  // namespace detail

// ---- Attention -------------------------------------------------------------------
// How attention schedules its work. kAuto: per head on CPU when every thread gets at
// least one (batch, kv-head) pair, else batched. Both give the same results and keep the
// same tensors; kPerHead is CPU only, and a q strided along head_dim runs batched.
enum class AttentionImpl { kAuto, kBatched, kPerHead };

struct AttentionOptions {
  // Causal: key j visible to query i iff j <= i + (Sk - S) (bottom-right alignment, as
  // PyTorch's is_causal with a KV cache and flash-attn). With S > Sk the first S - Sk
  // queries see no key: their output is 0 and no gradient flows through them.
  bool causal = false;
  double scale = 0.0;          // 0: 1 / sqrt(head_dim)
  at::Tensor key_padding_mask; // bool [B, Sk], true = attend; undefined = all
  int64_t chunk_bytes = 16 << 20;  // bound on the score blocks alive at once
  AttentionImpl impl = AttentionImpl::kAuto;
};
// Memory-efficient attention. q: [B, S, H, D]; k, v: [B, Sk, Hk, D] with H % Hk == 0
// (grouped-query attention when Hk < H). Returns a contiguous [B, S, H, D] tensor, so
// out.view({B, S, H * D}) feeds the output projection without a copy. Keeps q, k, v,
// the output and one fp32 logsumexp per (batch, head, query); the probabilities are
// recomputed in backward, in query chunks whose score block stays under chunk_bytes
// (causal attention also caps chunks at 128 queries, to skip the masked keys).
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionOptions& opts = {});

}  // namespace memfit::ops
