// Dropout whose mask is kept as 1 bit per element.
//
// Element i is kept iff mix32(seed, i) >= threshold, threshold = round(p * 2^32)
// (clamped), where mix32 is the counter-based hash below: the mask depends only on
// (seed, i), so CPU and CUDA draw the same mask for the same seed, and a forward can be
// replayed. Kept elements are scaled by dropout_scale(p), the float nearest 1 / (1 - p),
// computed once by the caller and passed to forward and backward alike.
//
// Mask layout: element i in byte i >> 3 at bit i & 7, ceil(n / 8) bytes.
#pragma once

#include <cstdint>

#include "kernels/dtype.h"

#if defined(__CUDACC__)
#define MEMFIT_HD __host__ __device__ __forceinline__
#else
#define MEMFIT_HD inline
#endif

namespace memfit::kernels {

inline constexpr int64_t packed1_bytes(int64_t n) { return (n + 7) / 8; }

// A counter-based 32-bit hash of (seed, index) with good avalanche (two rounds of the
// murmur3 finalizer over the mixed words). Only 32-bit operations, so loops over it
// vectorize.
MEMFIT_HD uint32_t dropout_mix32(uint64_t seed, uint32_t index_lo, uint32_t index_hi) {
  uint32_t h = static_cast<uint32_t>(seed) ^ (index_lo * 0x9E3779B9u);
  h ^= static_cast<uint32_t>(seed >> 32) + index_hi * 0x85EBCA77u;
  h ^= h >> 16; h *= 0x85EBCA6Bu; h ^= h >> 13; h *= 0xC2B2AE35u; h ^= h >> 16;
  h += index_lo ^ 0x27D4EB2Fu;
  h ^= h >> 16; h *= 0x7FEB352Du; h ^= h >> 15; h *= 0x846CA68Bu; h ^= h >> 16;
  return h;
}
MEMFIT_HD uint32_t dropout_mix32(uint64_t seed, uint64_t index) {
  return dropout_mix32(seed, static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32));
}

// Threshold for drop probability p in [0, 1): elements with hash below it are dropped.
MEMFIT_HD uint32_t dropout_threshold(float p) {
  const double t = static_cast<double>(p) * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t + 0.5);
}

// The one scale of kept elements for drop probability p (double, as the op takes it):
// forward, backward and any replay of dropout(x) use this very float.
MEMFIT_HD float dropout_scale(double p) { return static_cast<float>(1.0 / (1.0 - p)); }

// x: [n] -> y: [n] (x's dtype), mask: [packed1_bytes(n)]. p in [0, 1) sets the mask;
// kept elements are multiplied by scale (= dropout_scale(p)).
void dropout_forward_cpu(DType dt, const void* x, void* y, uint8_t* mask, int64_t n, float p,
                         float scale, uint64_t seed);
// y = x * mask * scale; the backward of dropout (x = dy, scale = dropout_scale(p)) and
// its replay in a backward that recomputes dropout(x). y may alias x.
void dropout_apply_cpu(DType dt, const void* x, const uint8_t* mask, void* y, int64_t n,
                       float scale);

void dropout_forward_cuda(DType dt, const void* x, void* y, uint8_t* mask, int64_t n, float p,
                          float scale, uint64_t seed, StreamHandle stream);
void dropout_apply_cuda(DType dt, const void* x, const uint8_t* mask, void* y, int64_t n,
                        float scale, StreamHandle stream);

}  // namespace memfit::kernels
