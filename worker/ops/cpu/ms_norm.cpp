// CPU bodies of MS-LayerNorm / MS-RMSNorm (kernels/ms_norm.h). One row per task; the
// reductions use `omp simd reduction`, which vectorizes without -ffast-math.
#include "kernels/ms_norm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "cpu/common.h"

namespace memfit::kernels {
namespace {

template <typename T>
float row_sum(const T* x, int64_t cols) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < cols; ++j) s += cpu::to_f32(x[j]);
  return s;
}

template <typename T, bool kLayerNorm>
void forward_impl(const T* x, T* y, float* rstd, int64_t rows, int64_t cols, float eps) {
  const int64_t grain = std::max<int64_t>(1, cpu::kGrain / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * cols;
      T* yr = y + r * cols;
      const float inv_n = 1.0f / static_cast<float>(cols);
      const float mean = kLayerNorm ? row_sum(xr, cols) * inv_n : 0.0f;
      float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
      for (int64_t j = 0; j < cols; ++j) {
        const float d = cpu::to_f32(xr[j]) - mean;
        ss += d * d;
      }
      const float rs = 1.0f / std::sqrt(ss * inv_n + eps);
      rstd[r] = rs;
      for (int64_t j = 0; j < cols; ++j) yr[j] = cpu::from_f32<T>((cpu::to_f32(xr[j]) - mean) * rs);
    }
  });
}

template <typename T, bool kLayerNorm>
void backward_impl(const T* dy, const T* y, const float* rstd, T* dx, int64_t rows,
                   int64_t cols) {
  const int64_t grain = std::max<int64_t>(1, cpu::kGrain / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* gr = dy + r * cols;
      const T* yr = y + r * cols;
      T* dr = dx + r * cols;
      const float inv_n = 1.0f / static_cast<float>(cols);
      float sg = 0.0f, sgy = 0.0f;
#pragma omp simd reduction(+ : sg, sgy)
      for (int64_t j = 0; j < cols; ++j) {
        const float g = cpu::to_f32(gr[j]);
        sg += g;
        sgy += g * cpu::to_f32(yr[j]);
      }
      const float mg = kLayerNorm ? sg * inv_n : 0.0f;
      const float mgy = sgy * inv_n;
      const float rs = rstd[r];
      for (int64_t j = 0; j < cols; ++j) {
        const float g = cpu::to_f32(gr[j]);
        dr[j] = cpu::from_f32<T>(rs * (g - mg - cpu::to_f32(yr[j]) * mgy));
      }
    }
  });
}

}  // namespace

void ms_norm_forward_cpu(NormKind kind, DType dt, const void* x, void* y, float* rstd,
                         int64_t rows, int64_t cols, float eps) {
  if (rows <= 0 || cols <= 0) return;
  cpu::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    if (kind == NormKind::kLayerNorm) {
      forward_impl<T, true>(static_cast<const T*>(x), static_cast<T*>(y), rstd, rows, cols, eps);
    } else {
      forward_impl<T, false>(static_cast<const T*>(x), static_cast<T*>(y), rstd, rows, cols, eps);
    }
  });
}

void ms_norm_backward_cpu(NormKind kind, DType dt, const void* dy, const void* y,
                          const float* rstd, void* dx, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return;
  cpu::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* dyp = static_cast<const T*>(dy);
    const T* yp = static_cast<const T*>(y);
    T* dxp = static_cast<T*>(dx);
    if (kind == NormKind::kLayerNorm) {
      backward_impl<T, true>(dyp, yp, rstd, dxp, rows, cols);
    } else {
      backward_impl<T, false>(dyp, yp, rstd, dxp, rows, cols);
    }
  });
}

}  // namespace memfit::kernels
