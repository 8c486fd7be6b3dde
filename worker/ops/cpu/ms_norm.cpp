// CPU bodies of MS-LayerNorm / MS-RMSNorm (kernels/ms_norm.h). One row per task; the
// reductions use `omp simd reduction`, which vectorizes without -ffast-math.
#include "kernels/ms_norm.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu/common.h"

namespace memfit::kernels {
namespace {

// sum_j f(x[j]) in double over 32 independent lanes (four vector accumulators with
// AVX-512, so the adds do not wait on each other), then the lanes added up.
template <typename T, typename F>
double row_sum_f64(const T* x, int64_t cols, F f) {
  constexpr int kLanes = 32;
  double acc[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= cols; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) acc[k] += f(static_cast<double>(cpu::to_f32(x[j + k])));
  }
  for (int k = 0; j < cols; ++j, ++k) acc[k] += f(static_cast<double>(cpu::to_f32(x[j])));
  for (int w = kLanes / 2; w > 0; w /= 2) {
    for (int k = 0; k < w; ++k) acc[k] += acc[k + w];
  }
  return acc[0];
}

// Row statistics in double, two-pass: a constant row gives a mean equal to its value
// and a variance of exactly 0 (fp32 sums left the mean one rounding off, which eps 1e-12
// turned into outputs near +-1), and squares of |x| up to FLT_MAX do not overflow.
// Per-row locals only: the op allocates nothing beyond y and rstd.
template <typename T, bool kLayerNorm>
void forward_impl(const T* x, T* y, float* rstd, int64_t rows, int64_t cols, float eps) {
  const int64_t grain = std::max<int64_t>(1, cpu::kGrain / std::max<int64_t>(cols, 1));
  at::parallel_for(0, rows, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* xr = x + r * cols;
      T* yr = y + r * cols;
      const double n = static_cast<double>(cols);
      const double mean = kLayerNorm ? row_sum_f64(xr, cols, [](double v) { return v; }) / n : 0.0;
      const double ss = row_sum_f64(xr, cols, [mean](double v) { return (v - mean) * (v - mean); });
      const double rs = 1.0 / std::sqrt(ss / n + static_cast<double>(eps));
      rstd[r] = static_cast<float>(rs);
      // Every |x - mean| <= sqrt(ss): below 1e38 the differences fit in fp32, and with rs
      // a normal float y is formed in fp32, the mean split into two floats (x - mean_hi
      // is exact where it matters, x near the mean; mean_lo carries the rest). Otherwise
      // (|x| near FLT_MAX) in double.
      if (ss < 1e76 && rs >= static_cast<double>(std::numeric_limits<float>::min())) {
        const float rsf = static_cast<float>(rs);
        const float mean_hi = static_cast<float>(mean);
        const float mean_lo = static_cast<float>(mean - static_cast<double>(mean_hi));
        for (int64_t j = 0; j < cols; ++j) {
          yr[j] = cpu::from_f32<T>(((cpu::to_f32(xr[j]) - mean_hi) - mean_lo) * rsf);
        }
      } else {
        for (int64_t j = 0; j < cols; ++j) {
          const double d = static_cast<double>(cpu::to_f32(xr[j])) - mean;
          yr[j] = cpu::from_f32<T>(static_cast<float>(d * rs));
        }
      }
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
