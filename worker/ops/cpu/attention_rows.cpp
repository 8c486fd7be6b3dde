// CPU bodies of the attention row kernels (kernels/attention_rows.h).
#include "kernels/attention_rows.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/common.h"

namespace memfit::kernels {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Visible keys of row r: [0, limit) intersected with the key mask row `mask` (or all).
struct RowView {
  int64_t limit;
  const uint8_t* mask;
};

inline RowView row_view(const AttentionRows& g, int64_t r) {
  int64_t limit = g.len;
  if (g.causal) limit = std::clamp<int64_t>(g.causal_base + r % g.chunk, 0, g.len);
  const uint8_t* mask = g.key_mask ? g.key_mask + (r / g.rows_per_batch) * g.key_mask_ld : nullptr;
  return {limit, mask};
}

template <typename Fn>
void for_rows(const AttentionRows& g, Fn&& fn) {
  const int64_t grain = std::max<int64_t>(1, cpu::kGrain / std::max<int64_t>(g.len, 1));
  at::parallel_for(0, g.rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) fn(r, row_view(g, r));
  });
}

}  // namespace

void attention_softmax_forward_cpu(const AttentionRows& g, float* s, float* lse) {
  for_rows(g, [&](int64_t r, RowView v) {
    float* row = s + r * g.ld;
    const int64_t lim = v.limit, len = g.len;
    const uint8_t* mask = v.mask;
    float m = kNegInf;
    if (mask) {
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < lim; ++j) m = std::max(m, mask[j] ? row[j] : kNegInf);
    } else {
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < lim; ++j) m = std::max(m, row[j]);
    }
    if (m == kNegInf) {  // sees no key
      for (int64_t j = 0; j < len; ++j) row[j] = 0.0f;
      lse[r] = kNegInf;
      return;
    }
    float sum = 0.0f;
    if (mask) {
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < lim; ++j) {
        const float e = mask[j] ? cpu::exp_f32(row[j] - m) : 0.0f;
        row[j] = e;
        sum += e;
      }
    } else {
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < lim; ++j) {
        const float e = cpu::exp_f32(row[j] - m);
        row[j] = e;
        sum += e;
      }
    }
    const float inv = 1.0f / sum;
    for (int64_t j = 0; j < lim; ++j) row[j] *= inv;
    for (int64_t j = lim; j < len; ++j) row[j] = 0.0f;
    lse[r] = m + std::log(sum);
  });
}

void attention_probs_cpu(const AttentionRows& g, float* s, const float* lse) {
  for_rows(g, [&](int64_t r, RowView v) {
    float* row = s + r * g.ld;
    const float l = lse[r];
    const int64_t lim = l == kNegInf ? 0 : v.limit;
    const uint8_t* mask = v.mask;
    if (mask) {
      for (int64_t j = 0; j < lim; ++j) row[j] = mask[j] ? cpu::exp_f32(row[j] - l) : 0.0f;
    } else {
      for (int64_t j = 0; j < lim; ++j) row[j] = cpu::exp_f32(row[j] - l);
    }
    for (int64_t j = lim; j < g.len; ++j) row[j] = 0.0f;
  });
}

void attention_dscores_cpu(const AttentionRows& g, float* dp, const float* p, const float* delta) {
  for_rows(g, [&](int64_t r, RowView v) {
    float* drow = dp + r * g.ld;
    const float* prow = p + r * g.ld;
    const float dl = delta[r];
    const int64_t lim = v.limit;
    for (int64_t j = 0; j < lim; ++j) drow[j] = prow[j] * (drow[j] - dl);
    for (int64_t j = lim; j < g.len; ++j) drow[j] = 0.0f;
  });
}

void attention_gather_cpu(DType dt, const void* src, const HeadsLayout& l, float scale, float* dst,
                          const void* dot_with, float* dot) {
  const int64_t rows = l.B * l.Hk * l.G * l.c;
  cpu::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* base = static_cast<const T*>(src);
    const T* other = static_cast<const T*>(dot_with);
    at::parallel_for(0, rows, std::max<int64_t>(1, cpu::kGrain / std::max<int64_t>(l.D, 1)),
                     [&](int64_t r0, int64_t r1) {
      const float sc = scale;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = r % l.c, g = (r / l.c) % l.G, hk = (r / (l.c * l.G)) % l.Hk;
        const int64_t b = r / (l.c * l.G * l.Hk);
        const int64_t off = b * l.stride_b + (l.s0 + i) * l.stride_s + (hk * l.G + g) * l.stride_h;
        const T* in = base + off;
        float* out = dst + r * l.D;
        for (int64_t d = 0; d < l.D; ++d) out[d] = cpu::to_f32(in[d]) * sc;
        if (other != nullptr) {
          const T* o = other + off;
          float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
          for (int64_t d = 0; d < l.D; ++d) acc += cpu::to_f32(in[d]) * cpu::to_f32(o[d]);
          dot[r] = acc;
        }
      }
    });
  });
}

void attention_scatter_cpu(DType dt, const float* src, const HeadsLayout& l, float scale, void* dst) {
  const int64_t rows = l.B * l.Hk * l.G * l.c;
  cpu::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    T* base = static_cast<T*>(dst);
    at::parallel_for(0, rows, std::max<int64_t>(1, cpu::kGrain / std::max<int64_t>(l.D, 1)),
                     [&](int64_t r0, int64_t r1) {
      const float sc = scale;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t i = r % l.c, g = (r / l.c) % l.G, hk = (r / (l.c * l.G)) % l.Hk;
        const int64_t b = r / (l.c * l.G * l.Hk);
        T* out = base + b * l.stride_b + (l.s0 + i) * l.stride_s + (hk * l.G + g) * l.stride_h;
        const float* in = src + r * l.D;
        for (int64_t d = 0; d < l.D; ++d) out[d] = cpu::from_f32<T>(in[d] * sc);
      }
    });
  });
}

}  // namespace memfit::kernels
