// CUDA bodies of MS-LayerNorm / MS-RMSNorm (kernels/ms_norm.h). One block per row
// (grid-stride over rows); every thread of the block takes part in each reduction, so
// the warp shuffles always run with all 32 lanes present.
#include "cuda/common.cuh"
#include "kernels/ms_norm.h"

namespace memfit::kernels {
namespace {

constexpr int kNormThreads = 256;  // a multiple of 32

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds 32 floats.
__device__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  float t = lane < nwarps ? scratch[lane] : 0.0f;
  t = warp_sum(t);  // every warp reduces the same partials: no second barrier needed
  return t;
}

// Sum of s and max of m over the block in one pair of barriers; every thread gets
// both. `scratch` holds 64 floats. m >= 0.
__device__ void block_sum_max(float& s, float& m, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int off = 16; off > 0; off >>= 1) {
    s += __shfl_xor_sync(0xffffffffu, s, off);
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  }
  __syncthreads();
  if (lane == 0) {
    scratch[warp] = s;
    scratch[32 + warp] = m;
  }
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  s = lane < nwarps ? scratch[lane] : 0.0f;
  m = lane < nwarps ? scratch[32 + lane] : 0.0f;
  for (int off = 16; off > 0; off >>= 1) {
    s += __shfl_xor_sync(0xffffffffu, s, off);
    m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
  }
}

// 1 while |values| < 2^32 (sums of squares cannot overflow fp32), else a power of two
// 2^-e with max_abs * 2^-e < 1, exact to multiply by.
__device__ __forceinline__ float overflow_scale(float max_abs) {
  if (!(max_abs >= 4294967296.0f) || isinf(max_abs)) return 1.0f;
  int e = 0;
  frexpf(max_abs, &e);  // max_abs = f * 2^e, f in [0.5, 1)
  return ldexpf(1.0f, -e);
}

// Row statistics in fp32, as the CPU body's double ones: LayerNorm shifts every value by
// the row's first element K before summing, so a constant row sums exact zeros (mean K,
// variance exactly 0 -- an unshifted fp32 mean is one rounding off, which eps 1e-12
// turned into outputs near +-1). Rows with |values| >= 2^32 are scaled by a power of two
// before squaring (the fp32 sum of squares overflowed for |x| >= ~1e18 and gave y = 0).
// Per-block registers and shared memory only: nothing is allocated.
template <typename T, bool kLayerNorm>
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                               float* __restrict__ rstd, int64_t rows, int64_t cols, float eps) {
  __shared__ float scratch[64];
  const float n = static_cast<float>(cols);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
    // Pass 1: shift K, sum and max |x - K| (RMSNorm: K = 0, sum of squares).
    const float k = kLayerNorm ? cuda::to_f32(xr[0]) : 0.0f;
    float s = 0.0f, m = 0.0f;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float d = cuda::to_f32(xr[j]) - k;
      s += kLayerNorm ? d : d * d;
      m = fmaxf(m, fabsf(d));
    }
    block_sum_max(s, m, scratch);
    const float inv = overflow_scale(m);  // 1 for ordinary rows
    float mu = 0.0f;  // LayerNorm: mean of (x - K) * inv
    float ss = s;     // RMSNorm: sum of (x * inv)^2
    if (inv != 1.0f) {  // the same branch for the whole block
      float s2 = 0.0f;
      for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
        const float d = (cuda::to_f32(xr[j]) - k) * inv;
        s2 += kLayerNorm ? d : d * d;
      }
      s2 = block_sum(s2, scratch);
      if (kLayerNorm) mu = s2 / n; else ss = s2;
    } else if (kLayerNorm) {
      mu = s / n;
    }
    if (kLayerNorm) {  // pass 2: squares of the centred, scaled values
      float s2 = 0.0f;
      for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
        const float d = (cuda::to_f32(xr[j]) - k) * inv - mu;
        s2 += d * d;
      }
      ss = block_sum(s2, scratch);
    }
    // var(x) = (ss / n) / inv^2: r = inv / sqrt(ss / n + eps * inv^2).
    const float rs_scaled = rsqrtf(ss / n + eps * inv * inv);
    if (threadIdx.x == 0) rstd[r] = rs_scaled * inv;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      yr[j] = cuda::from_f32<T>(((cuda::to_f32(xr[j]) - k) * inv - mu) * rs_scaled);
    }
  }
}

template <typename T, bool kLayerNorm>
__global__ void backward_kernel(const T* __restrict__ dy, const T* __restrict__ y,
                                const float* __restrict__ rstd, T* __restrict__ dx, int64_t rows,
                                int64_t cols) {
  __shared__ float scratch[32];
  const float inv_n = 1.0f / static_cast<float>(cols);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* gr = dy + r * cols;
    const T* yr = y + r * cols;
    T* dr = dx + r * cols;
    float sg = 0.0f, sgy = 0.0f;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float g = cuda::to_f32(gr[j]);
      sg += g;
      sgy += g * cuda::to_f32(yr[j]);
    }
    const float mg = kLayerNorm ? block_sum(sg, scratch) * inv_n : 0.0f;
    const float mgy = block_sum(sgy, scratch) * inv_n;
    const float rs = rstd[r];
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float g = cuda::to_f32(gr[j]);
      dr[j] = cuda::from_f32<T>(rs * (g - mg - cuda::to_f32(yr[j]) * mgy));
    }
  }
}

unsigned int row_blocks(int64_t rows) {
  return static_cast<unsigned int>(rows > 262144 ? 262144 : rows);
}

}  // namespace

void ms_norm_forward_cuda(NormKind kind, DType dt, const void* x, void* y, float* rstd,
                          int64_t rows, int64_t cols, float eps, StreamHandle stream) {
  if (rows <= 0 || cols <= 0) return;
  cuda::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const auto s = cuda::as_stream(stream);
    if (kind == NormKind::kLayerNorm) {
      forward_kernel<T, true><<<row_blocks(rows), kNormThreads, 0, s>>>(
          static_cast<const T*>(x), static_cast<T*>(y), rstd, rows, cols, eps);
    } else {
      forward_kernel<T, false><<<row_blocks(rows), kNormThreads, 0, s>>>(
          static_cast<const T*>(x), static_cast<T*>(y), rstd, rows, cols, eps);
    }
  });
  cuda::check_launch("ms_norm_forward");
}

void ms_norm_backward_cuda(NormKind kind, DType dt, const void* dy, const void* y,
                           const float* rstd, void* dx, int64_t rows, int64_t cols,
                           StreamHandle stream) {
  if (rows <= 0 || cols <= 0) return;
  cuda::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const auto s = cuda::as_stream(stream);
    if (kind == NormKind::kLayerNorm) {
      backward_kernel<T, true><<<row_blocks(rows), kNormThreads, 0, s>>>(
          static_cast<const T*>(dy), static_cast<const T*>(y), rstd, static_cast<T*>(dx), rows, cols);
    } else {
      backward_kernel<T, false><<<row_blocks(rows), kNormThreads, 0, s>>>(
          static_cast<const T*>(dy), static_cast<const T*>(y), rstd, static_cast<T*>(dx), rows, cols);
    }
  });
  cuda::check_launch("ms_norm_backward");
}

}  // namespace memfit::kernels
