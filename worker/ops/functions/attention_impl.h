// Internal to memfit::ops::attention: the geometry of one call and the helpers its two
// implementations share. The batched path (attention.cpp) runs every head of every
// sequence through one batched product per step and serves any device; the per-head
// path (attention_cpu.cpp) gives each CPU thread whole (batch, kv-head) pairs, so a
// head's score block stays in cache and only one block per thread is ever alive.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>

#include "kernels/attention_rows.h"

namespace memfit::ops::detail::attn {

constexpr int64_t kCausalChunkRows = 128;

struct Geometry {
  int64_t B, S, H, D, Sk, Hk, G;
  double scale;
  bool causal;
  int64_t chunk;  // query positions per chunk
};

inline Geometry geometry(const at::Tensor& q, const at::Tensor& k, double scale, bool causal,
                         int64_t chunk_bytes) {
  Geometry g{};
  g.B = q.size(0); g.S = q.size(1); g.H = q.size(2); g.D = q.size(3);
  g.Sk = k.size(1); g.Hk = k.size(2); g.G = g.H / std::max<int64_t>(g.Hk, 1);
  g.scale = scale > 0.0 ? scale : 1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(g.D, 1)));
  g.causal = causal;
  // A chunk's score block is B * H * c * Sk fp32 values; backward holds two such blocks.
  const int64_t row_bytes = std::max<int64_t>(1, g.B * g.H * g.Sk * 4);
  g.chunk = std::clamp<int64_t>(chunk_bytes / row_bytes, 1, std::max<int64_t>(g.S, 1));
  // Causal: a chunk only multiplies against the keys its last query sees, so smaller
  // chunks skip more of the masked triangle. 128 rows measured best here (S = 256:
  // 20.8 ms vs 25.9 ms as one chunk; S = 1024: 275 ms vs 553 ms; 32 rows: per-chunk
  // overheads win again).
  if (causal) g.chunk = std::min<int64_t>(g.chunk, kCausalChunkRows);
  return g;
}

inline kernels::HeadsLayout layout_of(const at::Tensor& t, int64_t s0, int64_t c, int64_t heads_kv,
                               int64_t group) {
  kernels::HeadsLayout l;
  l.B = t.size(0);
  l.c = c;
  l.Hk = heads_kv;
  l.G = group;
  l.D = t.size(3);
  l.s0 = s0;
  l.stride_b = t.stride(0);
  l.stride_s = t.stride(1);
  l.stride_h = t.stride(2);
  return l;
}

// Keys the chunk [s0, s0 + c) can see at all: with causality, none past s0 + c - 1 + off.
inline int64_t key_limit(const Geometry& g, int64_t s0, int64_t c) {
  if (!g.causal) return g.Sk;
  return std::clamp<int64_t>(s0 + c + (g.Sk - g.S), 0, g.Sk);
}

inline kernels::AttentionRows rows_of(const Geometry& g, int64_t s0, int64_t c, int64_t len,
                               const at::Tensor& key_mask) {
  kernels::AttentionRows r;
  r.rows = g.B * g.H * c;
  r.len = len;
  r.ld = len;
  r.chunk = c;
  r.rows_per_batch = g.H * c;
  r.causal = g.causal;
  r.causal_base = s0 + (g.Sk - g.S) + 1;  // negative while queries see no key
  if (key_mask.defined()) {
    r.key_mask = key_mask.data_ptr<uint8_t>();
    r.key_mask_ld = key_mask.size(1);
  }
  return r;
}

// The per-head CPU path pays off when every thread gets at least one (batch, kv-head)
// pair; with fewer pairs the batched path keeps both cores on each product. The
// per-head path gathers q rows with a contiguous head_dim; a q strided along head_dim
// runs batched (whose CPU gather falls back to ATen for it), whatever impl asks.
inline bool use_per_head(const at::Tensor& q, const Geometry& g, int threads, int64_t impl) {
  if (impl == 1) return false;  // AttentionImpl::kBatched
  if (q.size(3) > 1 && q.stride(3) != 1) return false;
  if (impl == 2) return true;   // AttentionImpl::kPerHead (checked: CPU)
  return q.device().is_cpu() && g.B * g.Hk >= threads;
}

// Per-head CPU implementation. mask: uint8 [B, Sk] or undefined; out, lse preallocated
// ([B, S, H, D], [B, H, S] fp32). dout must be contiguous like out.
// Query chunks are sized so that the score blocks alive at once (one per thread) stay
// under chunk_bytes.
void forward_per_head(const Geometry& g, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& mask, const at::Tensor& out,
                      const at::Tensor& lse, int64_t chunk_bytes);
void backward_per_head(const Geometry& g, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                       const at::Tensor& mask, const at::Tensor& dout, const at::Tensor& dq,
                       const at::Tensor& dk, const at::Tensor& dv, int64_t chunk_bytes);

}  // namespace memfit::ops::detail::attn
