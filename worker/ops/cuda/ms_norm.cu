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

template <typename T, bool kLayerNorm>
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                               float* __restrict__ rstd, int64_t rows, int64_t cols, float eps) {
  __shared__ float scratch[32];
  const float inv_n = 1.0f / static_cast<float>(cols);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * cols;
    T* yr = y + r * cols;
    float mean = 0.0f;
    if (kLayerNorm) {
      float s = 0.0f;
      for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) s += cuda::to_f32(xr[j]);
      mean = block_sum(s, scratch) * inv_n;
    }
    float ss = 0.0f;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      const float d = cuda::to_f32(xr[j]) - mean;
      ss += d * d;
    }
    const float rs = rsqrtf(block_sum(ss, scratch) * inv_n + eps);
    if (threadIdx.x == 0) rstd[r] = rs;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
      yr[j] = cuda::from_f32<T>((cuda::to_f32(xr[j]) - mean) * rs);
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
