// CUDA bodies of the 1-bit-mask dropout (kernels/dropout_bits.h). The mask comes from
// the same counter-based hash as on CPU, so both draw identical masks for one seed.
#include "cuda/common.cuh"
#include "kernels/dropout_bits.h"

namespace memfit::kernels {
namespace {

template <typename T>
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                               uint8_t* __restrict__ mask, int64_t n, uint32_t threshold,
                               float scale, uint64_t seed) {
  const int64_t nbytes = (n + 7) / 8;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < nbytes;
       b += stride) {
    uint8_t byte = 0;
    for (int j = 0; j < 8; ++j) {
      const int64_t i = 8 * b + j;
      if (i >= n) break;
      const bool keep = dropout_mix32(seed, static_cast<uint64_t>(i)) >= threshold;
      y[i] = cuda::from_f32<T>(keep ? cuda::to_f32(x[i]) * scale : 0.0f);
      byte |= static_cast<uint8_t>(keep) << j;
    }
    mask[b] = byte;
  }
}

template <typename T>
__global__ void apply_kernel(const T* x, const uint8_t* __restrict__ mask, T* y, int64_t n,
                             float scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const bool keep = (mask[i >> 3] >> (i & 7)) & 1;
    y[i] = cuda::from_f32<T>(keep ? cuda::to_f32(x[i]) * scale : 0.0f);
  }
}

}  // namespace

void dropout_forward_cuda(DType dt, const void* x, void* y, uint8_t* mask, int64_t n, float p,
                          float scale, uint64_t seed, StreamHandle stream) {
  if (n <= 0) return;
  const uint32_t threshold = dropout_threshold(p);
  cuda::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    forward_kernel<T><<<cuda::blocks_for(packed1_bytes(n)), cuda::kThreads, 0,
                        cuda::as_stream(stream)>>>(static_cast<const T*>(x), static_cast<T*>(y),
                                                   mask, n, threshold, scale, seed);
  });
  cuda::check_launch("dropout_forward");
}

void dropout_apply_cuda(DType dt, const void* x, const uint8_t* mask, void* y, int64_t n,
                        float scale, StreamHandle stream) {
  if (n <= 0) return;
  cuda::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    apply_kernel<T><<<cuda::blocks_for(n), cuda::kThreads, 0, cuda::as_stream(stream)>>>(
        static_cast<const T*>(x), mask, static_cast<T*>(y), n, scale);
  });
  cuda::check_launch("dropout_apply");
}

}  // namespace memfit::kernels
