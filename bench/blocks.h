// Transformer blocks for the benchmark and the accounting tests: a ViT-B/16-shaped
// pre-LN block (GELU MLP) and a LLaMA-shaped block (RMSNorm, RoPE, SwiGLU, optional
// grouped-query attention), both with LoRA on every linear layer and a frozen base.
// Each block runs in one of four modes (see docs/ACCOUNTING.md):
//   kExactStockAttention  stock LibTorch ops everywhere (softmax attention composite)
//   kExact                stock ops, memfit's memory-efficient attention
//   kPaper                ReGELU2/ReSiLU2 + MS norms (affine merged) + sharing linears
//   kBest                 kPaper + fused MLP tails (keep pre-activations, recompute)
// expected_kept_bytes() is the byte count each mode should keep after forward, derived
// from every op's documented save rule; tests hold the measured count to it.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "ops.h"

namespace memfit::bench {

enum class Arch { kViT, kLlama };
enum class Mode { kExactStockAttention, kExact, kPaper, kBest };

const char* mode_name(Mode m);

struct BlockShape {
  Arch arch = Arch::kViT;
  int64_t batch = 1, seq = 1, d = 1, heads = 1, kv_heads = 1, inter = 1;
  int64_t rank = 8;
  double lora_alpha = 16.0;
  double norm_eps = 1e-6;
  int64_t tokens() const { return batch * seq; }
  int64_t head_dim() const { return d / heads; }
};

BlockShape vit_b16_block(int64_t batch);
BlockShape llama7b_block(int64_t batch, int64_t seq);

// Byte counts, split so that reports can show where the memory goes.
struct KeptBytes {
  int64_t total = 0;
  std::vector<std::pair<std::string, int64_t>> parts;
  void add(const std::string& what, int64_t bytes);
};

KeptBytes expected_kept_bytes(const BlockShape& s, Mode m);

// softmax(q k^T / sqrt(D) [+ causal mask]) v from stock LibTorch 1.13 ops (no SDPA there).
// q: [B, S, H, D]; k, v: [B, S, Hk, D]. Returns [B, S, H * D].
at::Tensor stock_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           bool causal);

class Block {
 public:
  // Weights are drawn on CPU from `seed` (the same on every device), then moved.
  Block(const BlockShape& shape, uint64_t seed, at::Device device = at::Device(at::kCPU));
  const BlockShape& shape() const { return shape_; }
  // x: [batch, seq, d] fp32. Returns [batch, seq, d].
  at::Tensor forward(const at::Tensor& x, Mode mode) const;
  // The LoRA factors (the only trainable tensors).
  std::vector<at::Tensor> trainable() const;
  void zero_grad() const;

 private:
  struct Linear {
    at::Tensor w, b;      // original (exact modes)
    at::Tensor wm, bm;    // with the preceding norm's affine merged in (paper/best)
    at::Tensor a, bb;     // LoRA factors
    at::Tensor in_scale, in_shift;  // the preceding norm's gamma/beta, or undefined
  };
  struct Norm {
    at::Tensor gamma, beta;  // beta undefined for RMSNorm
  };
  Linear make_linear(int64_t in, int64_t out, bool bias, const Norm* before);
  at::Tensor stock_linear(const at::Tensor& x, const Linear& l) const;
  at::Tensor memfit_linear(const at::Tensor& x, const Linear& l, bool merged) const;
  ops::LinearWeights weights(const Linear& l, bool merged) const;
  at::Tensor norm(const at::Tensor& x, const Norm& n, Mode mode) const;
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, Mode mode) const;
  at::Tensor rope(const at::Tensor& t) const;

  BlockShape shape_;
  double scale_;
  Norm n1_, n2_;
  Linear q_, k_, v_, o_, up_, gate_, down_;  // ViT: up_ = fc1, down_ = fc2
  at::Tensor cos_, sin_;                      // RoPE tables [seq, 1, head_dim]
};

}  // namespace memfit::bench
