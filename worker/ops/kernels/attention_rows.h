// Row-wise pieces of memory-efficient attention, between the matrix products that ATen
// (BLAS / cuBLAS) does. Scores are fp32 blocks [rows, L] for one chunk of queries.
//
// Row geometry: rows are ordered (batch, kv_head, group, i) with i in [0, c) the query
// offset inside the chunk; `rows_per_batch` = kv_heads * group * c. Query i of the chunk
// may see key j iff
//   j < causal_base + i   (only when causal; causal_base = s0 + (Sk - S) + 1, any sign)
//   and key_mask[b * key_mask_ld + j] != 0   (only when key_mask != nullptr).
// Causal alignment is bottom-right (PyTorch's is_causal with a KV cache, flash-attn):
// query s sees keys j <= s + (Sk - S), so with S > Sk the first S - Sk queries see none
// and causal_base is negative. Hidden keys get probability 0; a row that sees no key has
// all-zero probabilities and logsumexp -inf (output 0, gradients 0, no NaN).
#pragma once

#include <cstdint>

#include "kernels/dtype.h"

namespace memfit::kernels {

struct AttentionRows {
  int64_t rows = 0;            // rows in the block
  int64_t len = 0;             // keys per row (L)
  int64_t ld = 0;              // row stride of the score block (>= len)
  int64_t chunk = 1;           // c: queries per (batch, head) in the block
  int64_t rows_per_batch = 1;  // kv_heads * group * c
  bool causal = false;         // apply the causal limit below
  int64_t causal_base = 0;     // causal: row i of a chunk sees keys j < causal_base + i
  const uint8_t* key_mask = nullptr;  // [batch, key_mask_ld] or null
  int64_t key_mask_ld = 0;
};

// s: scores -> probabilities in place; lse: [rows] logsumexp of the visible scores.
void attention_softmax_forward_cpu(const AttentionRows& g, float* s, float* lse);
// s: scores -> probabilities exp(s - lse) in place (hidden keys 0).
void attention_probs_cpu(const AttentionRows& g, float* s, const float* lse);
// dp: dP -> dS = P * (dP - delta[row]) in place; p: probabilities (same layout).
void attention_dscores_cpu(const AttentionRows& g, float* dp, const float* p, const float* delta);

// Regrouping queries/keys between the model's [B, S, H, D] layout (any strides, D
// contiguous) and the heads-major fp32 blocks the products use: row
// ((b * Hk + hk) * G + g) * c + i of the block is position s0 + i, head hk * G + g.
struct HeadsLayout {
  int64_t B = 0, c = 0, Hk = 0, G = 1, D = 0;
  int64_t s0 = 0;
  int64_t stride_b = 0, stride_s = 0, stride_h = 0;  // of the [B, S, H, D] tensor, elements
};
// dst[row, :] = src(b, s0 + i, h, :) * scale, converted to fp32. If dot_with is given (a
// tensor of src's dtype and strides), also dot[row] = sum_d src(...) * dot_with(...): the
// attention backward's rowsum(dO * O) in the same pass over dO.
void attention_gather_cpu(DType dt, const void* src, const HeadsLayout& l, float scale, float* dst,
                          const void* dot_with = nullptr, float* dot = nullptr);
// dst(b, s0 + i, h, :) = src[row, :] * scale converted to dt (dst has the layout's strides).
void attention_scatter_cpu(DType dt, const float* src, const HeadsLayout& l, float scale, void* dst);

void attention_softmax_forward_cuda(const AttentionRows& g, float* s, float* lse, StreamHandle stream);
void attention_probs_cuda(const AttentionRows& g, float* s, const float* lse, StreamHandle stream);
void attention_dscores_cuda(const AttentionRows& g, float* dp, const float* p, const float* delta,
                            StreamHandle stream);

}  // namespace memfit::kernels
