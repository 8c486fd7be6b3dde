// CPU bodies of ReGELU2 / ReSiLU2 (kernels/approx_act.h).
#include "kernels/approx_act.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/common.h"

namespace memfit::kernels {
namespace {

// kAct: 0 GELU (erf), 1 SiLU, 2 GELU (tanh).
template <typename T, int kAct>
void forward_impl(const T* x, T* y, uint8_t* flags, int64_t n, const StepLevels& lv) {
  // Parallel over flag bytes, so that no two threads write the same byte.
  const int64_t nbytes = packed2_bytes(n);
  at::parallel_for(0, nbytes, cpu::kGrain / 4, [&](int64_t b0, int64_t b1) {
    uint8_t f[cpu::kBlock];
    const float c0 = lv.c[0], c1 = lv.c[1], c2 = lv.c[2];
    const int64_t end = std::min(b1 * 4, n);
    for (int64_t i0 = b0 * 4; i0 < end; i0 += cpu::kBlock) {
      const int64_t len = std::min<int64_t>(cpu::kBlock, end - i0);
      // Write results straight through: staging them in a float buffer costs more than
      // it saves (measured).
      for (int64_t j = 0; j < len; ++j) {
        const float v = cpu::to_f32(x[i0 + j]);
        const float a = kAct == 0 ? cpu::gelu_f32(v) : (kAct == 1 ? cpu::silu_f32(v) : cpu::gelu_tanh_f32(v));
        y[i0 + j] = cpu::from_f32<T>(a);
        f[j] = static_cast<uint8_t>((v > c0) + (v > c1) + (v > c2));
      }
      // i0 is a multiple of 4 (blocks are multiples of 4), so bytes start aligned.
      const int64_t full = len / 4;
      uint8_t* out = flags + i0 / 4;
      for (int64_t k = 0; k < full; ++k) {
        out[k] = static_cast<uint8_t>(f[4 * k] | (f[4 * k + 1] << 2) | (f[4 * k + 2] << 4) |
                                      (f[4 * k + 3] << 6));
      }
      if (len % 4 != 0) {
        uint8_t byte = 0;
        for (int64_t j = full * 4; j < len; ++j) byte |= static_cast<uint8_t>(f[j] << (2 * (j & 3)));
        out[full] = byte;
      }
    }
  });
}

template <typename T>
void backward_impl(const T* dy, const uint8_t* flags, T* dx, int64_t n, const StepLevels& lv) {
  const int64_t nbytes = packed2_bytes(n);
  at::parallel_for(0, nbytes, cpu::kGrain / 4, [&](int64_t b0, int64_t b1) {
    // Levels as locals: read through the lambda's captured references they become
    // masked loads that GCC will not vectorize.
    const float s0 = lv.s[0], s1 = lv.s[1], s2 = lv.s[2], s3 = lv.s[3];
    uint8_t code[cpu::kBlock];
    const int64_t end = std::min(b1 * 4, n);
    for (int64_t i0 = b0 * 4; i0 < end; i0 += cpu::kBlock) {
      const int64_t len = std::min<int64_t>(cpu::kBlock, end - i0);
      const uint8_t* fb = flags + i0 / 4;
      // Unpack first (a byte-wise loop), then a select chain over whole vectors:
      // indexing the packed byte per element defeats vectorization.
      for (int64_t k = 0; k < (len + 3) / 4; ++k) {
        const uint8_t b = fb[k];
        code[4 * k] = b & 3;
        code[4 * k + 1] = (b >> 2) & 3;
        code[4 * k + 2] = (b >> 4) & 3;
        code[4 * k + 3] = b >> 6;
      }
      for (int64_t j = 0; j < len; ++j) {
        const uint8_t c = code[j];
        const float s = c == 0 ? s0 : (c == 1 ? s1 : (c == 2 ? s2 : s3));
        dx[i0 + j] = cpu::from_f32<T>(cpu::to_f32(dy[i0 + j]) * s);
      }
    }
  });
}

}  // namespace

void approx_act_forward_cpu(ApproxAct act, DType dt, const void* x, void* y, uint8_t* flags,
                            int64_t n) {
  if (n <= 0) return;
  const StepLevels lv = step_levels(act);
  cpu::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    T* yp = static_cast<T*>(y);
    switch (act) {
      case ApproxAct::kReGELU2: forward_impl<T, 0>(xp, yp, flags, n, lv); break;
      case ApproxAct::kReSiLU2: forward_impl<T, 1>(xp, yp, flags, n, lv); break;
      case ApproxAct::kReGELU2Tanh: forward_impl<T, 2>(xp, yp, flags, n, lv); break;
    }
  });
}

void approx_act_backward_cpu(ApproxAct act, DType dt, const void* dy, const uint8_t* flags,
                             void* dx, int64_t n) {
  if (n <= 0) return;
  const StepLevels lv = step_levels(act);
  cpu::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    backward_impl<T>(static_cast<const T*>(dy), flags, static_cast<T*>(dx), n, lv);
  });
}

}  // namespace memfit::kernels
