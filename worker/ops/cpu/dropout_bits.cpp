// CPU bodies of the 1-bit-mask dropout (kernels/dropout_bits.h).
#include "kernels/dropout_bits.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/common.h"

namespace memfit::kernels {
namespace {

// Blocks start on whole mask bytes (multiples of 8 elements) and never cross a 2^32
// boundary of the element index, so the index's high word is constant in a block.
template <typename T>
void forward_impl(const T* x, T* y, uint8_t* mask, int64_t n, float p, float scale_arg,
                  uint64_t seed) {
  const int64_t nbytes = packed1_bytes(n);
  at::parallel_for(0, nbytes, cpu::kGrain / 8, [&](int64_t b0, int64_t b1) {
    // Scalars as locals (not captured references), so that the loops vectorize.
    const uint32_t threshold = dropout_threshold(p);
    const float scale = scale_arg;
    const uint64_t s = seed;
    uint8_t keep[cpu::kBlock];
    const int64_t end = std::min(b1 * 8, n);
    for (int64_t i0 = b0 * 8, len = 0; i0 < end; i0 += len) {
      const uint32_t lo0 = static_cast<uint32_t>(i0);
      const uint32_t hi = static_cast<uint32_t>(static_cast<uint64_t>(i0) >> 32);
      // Stop at the next 2^32 boundary so that the high word stays constant.
      len = std::min<int64_t>({cpu::kBlock, end - i0, (int64_t{1} << 32) - lo0});
      for (int64_t j = 0; j < len; ++j) {
        const uint32_t h = dropout_mix32(s, lo0 + static_cast<uint32_t>(j), hi);
        keep[j] = h >= threshold ? 1 : 0;
      }
      for (int64_t j = 0; j < len; ++j) {
        y[i0 + j] = cpu::from_f32<T>(keep[j] ? cpu::to_f32(x[i0 + j]) * scale : 0.0f);
      }
      uint8_t* out = mask + i0 / 8;
      const int64_t full = len / 8;
      for (int64_t k = 0; k < full; ++k) {
        uint8_t byte = 0;
        for (int b = 0; b < 8; ++b) byte |= static_cast<uint8_t>(keep[8 * k + b] << b);
        out[k] = byte;
      }
      if (len % 8 != 0) {
        uint8_t byte = 0;
        for (int64_t j = full * 8; j < len; ++j) byte |= static_cast<uint8_t>(keep[j] << (j & 7));
        out[full] = byte;
      }
    }
  });
}

template <typename T>
void apply_impl(const T* x, const uint8_t* mask, T* y, int64_t n, float scale_arg) {
  const int64_t nbytes = packed1_bytes(n);
  at::parallel_for(0, nbytes, cpu::kGrain / 8, [&](int64_t b0, int64_t b1) {
    const float scale = scale_arg;
    uint8_t keep[cpu::kBlock];
    const int64_t end = std::min(b1 * 8, n);
    for (int64_t i0 = b0 * 8; i0 < end; i0 += cpu::kBlock) {
      const int64_t len = std::min<int64_t>(cpu::kBlock, end - i0);
      const uint8_t* mb = mask + i0 / 8;
      for (int64_t k = 0; k < (len + 7) / 8; ++k) {
        for (int b = 0; b < 8; ++b) keep[8 * k + b] = (mb[k] >> b) & 1;
      }
      for (int64_t j = 0; j < len; ++j) {
        y[i0 + j] = cpu::from_f32<T>(keep[j] ? cpu::to_f32(x[i0 + j]) * scale : 0.0f);
      }
    }
  });
}

}  // namespace

void dropout_forward_cpu(DType dt, const void* x, void* y, uint8_t* mask, int64_t n, float p,
                         float scale, uint64_t seed) {
  if (n <= 0) return;
  cpu::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    forward_impl<T>(static_cast<const T*>(x), static_cast<T*>(y), mask, n, p, scale, seed);
  });
}

void dropout_apply_cpu(DType dt, const void* x, const uint8_t* mask, void* y, int64_t n,
                       float scale) {
  if (n <= 0) return;
  cpu::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    apply_impl<T>(static_cast<const T*>(x), mask, static_cast<T*>(y), n, scale);
  });
}

}  // namespace memfit::kernels
