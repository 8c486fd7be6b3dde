// Helpers shared by the CUDA kernel bodies: element conversion, dtype dispatch, launch
// sizing with 64-bit grid-stride loops, and launch-error reporting (as std::runtime_error,
// which the dispatch turns into a c10::Error). No torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/dtype.h"

namespace memfit::kernels::cuda {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_f32(float f);
template <>
__device__ __forceinline__ float from_f32<float>(float f) { return f; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float f) { return __float2bfloat16_rn(f); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float f) { return __float2half_rn(f); }

template <typename Fn>
inline void dispatch_dtype(DType dt, Fn&& fn) {
  switch (dt) {
    case DType::kFloat32: fn(float{}); return;
    case DType::kBFloat16: fn(__nv_bfloat16{}); return;
    case DType::kFloat16: fn(__half{}); return;
  }
}

inline constexpr int kThreads = 256;

// Blocks for `work` independent items handled by grid-stride loops.
inline unsigned int blocks_for(int64_t work) {
  const int64_t b = (work + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(b < 1 ? 1 : (b > 262144 ? 262144 : b));
}

inline cudaStream_t as_stream(StreamHandle s) { return static_cast<cudaStream_t>(s); }

inline void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("memfit CUDA kernel ") + kernel +
                             " failed to launch: " + cudaGetErrorString(err));
  }
}

// Exact activations and their derivatives, with the same special-value rules as the
// CPU bodies (cpu/common.h).
__device__ __forceinline__ float gelu(float x) {
  const float y = 0.5f * x * erfcf(-0.70710678118654752f * x);
  return x < -40.0f ? -0.0f : y;
}
__device__ __forceinline__ float gelu_grad(float x) {
  const float cdf = 0.5f * erfcf(-0.70710678118654752f * x);
  const float pdf = 0.3989422804014327f * expf(-0.5f * x * x);
  const float d = cdf + x * pdf;
  return x > 40.0f ? 1.0f : (x < -40.0f ? 0.0f : d);
}
__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ float gelu_tanh(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  const float y = x * sigmoid(2.0f * u);
  return x < -40.0f ? -0.0f : (x > 40.0f ? x : y);
}
__device__ __forceinline__ float gelu_tanh_grad(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  const float s = sigmoid(2.0f * u);
  const float d = s + 0.5f * x * 4.0f * s * (1.0f - s) * 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x * x);
  return x > 40.0f ? 1.0f : (x < -40.0f ? 0.0f : d);
}
__device__ __forceinline__ float silu(float x) {
  const float y = x * sigmoid(x);
  return x < -120.0f ? -0.0f : y;
}
__device__ __forceinline__ float silu_grad(float x) {
  const float s = sigmoid(x);
  const float d = s * (1.0f + x * (1.0f - s));
  return x > 120.0f ? 1.0f : (x < -120.0f ? 0.0f : d);
}

}  // namespace memfit::kernels::cuda
