// CUDA bodies of the exact activations used by the fused MLP tails (kernels/act.h).
#include "cuda/common.cuh"
#include "kernels/act.h"

namespace memfit::kernels {
namespace {

#define MEMFIT_GRID_STRIDE(i, n)                                                         \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// kAct: 0 GELU, 1 SiLU, 2 GELU tanh.
template <int kAct>
__device__ __forceinline__ float act_value(float v) {
  return kAct == 0 ? cuda::gelu(v) : (kAct == 1 ? cuda::silu(v) : cuda::gelu_tanh(v));
}
template <int kAct>
__device__ __forceinline__ float act_grad(float v) {
  return kAct == 0 ? cuda::gelu_grad(v) : (kAct == 1 ? cuda::silu_grad(v) : cuda::gelu_tanh_grad(v));
}

template <typename T, int kAct>
__global__ void act_forward_kernel(const T* __restrict__ x, T* __restrict__ h, int64_t n) {
  MEMFIT_GRID_STRIDE(i, n) { h[i] = cuda::from_f32<T>(act_value<kAct>(cuda::to_f32(x[i]))); }
}

template <typename T, int kAct>
__global__ void act_backward_kernel(const T* __restrict__ x, const T* dh, T* dx, int64_t n) {
  MEMFIT_GRID_STRIDE(i, n) {
    dx[i] = cuda::from_f32<T>(cuda::to_f32(dh[i]) * act_grad<kAct>(cuda::to_f32(x[i])));
  }
}

template <typename T>
__global__ void swiglu_forward_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                      T* __restrict__ h, int64_t n) {
  MEMFIT_GRID_STRIDE(i, n) {
    h[i] = cuda::from_f32<T>(cuda::silu(cuda::to_f32(g[i])) * cuda::to_f32(u[i]));
  }
}

template <typename T>
__global__ void swiglu_backward_kernel(const T* __restrict__ g, const T* __restrict__ u,
                                       const T* __restrict__ dh, T* __restrict__ dg,
                                       T* __restrict__ du, int64_t n) {
  MEMFIT_GRID_STRIDE(i, n) {
    const float x = cuda::to_f32(g[i]);
    const float d = cuda::to_f32(dh[i]);
    dg[i] = cuda::from_f32<T>(d * cuda::to_f32(u[i]) * cuda::silu_grad(x));
    du[i] = cuda::from_f32<T>(d * cuda::silu(x));
  }
}

#undef MEMFIT_GRID_STRIDE

}  // namespace

void act_forward_cuda(Act act, DType dt, const void* x, void* h, int64_t n, StreamHandle stream) {
  if (n <= 0) return;
  cuda::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const auto s = cuda::as_stream(stream);
    const T* xp = static_cast<const T*>(x);
    T* hp = static_cast<T*>(h);
    const unsigned int b = cuda::blocks_for(n);
    switch (act) {
      case Act::kGELU: act_forward_kernel<T, 0><<<b, cuda::kThreads, 0, s>>>(xp, hp, n); break;
      case Act::kSiLU: act_forward_kernel<T, 1><<<b, cuda::kThreads, 0, s>>>(xp, hp, n); break;
      case Act::kGELUTanh: act_forward_kernel<T, 2><<<b, cuda::kThreads, 0, s>>>(xp, hp, n); break;
    }
  });
  cuda::check_launch("act_forward");
}

void act_backward_cuda(Act act, DType dt, const void* x, const void* dh, void* dx, int64_t n,
                       StreamHandle stream) {
  if (n <= 0) return;
  cuda::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const auto s = cuda::as_stream(stream);
    const T* xp = static_cast<const T*>(x);
    const T* dhp = static_cast<const T*>(dh);
    T* dxp = static_cast<T*>(dx);
    const unsigned int b = cuda::blocks_for(n);
    switch (act) {
      case Act::kGELU: act_backward_kernel<T, 0><<<b, cuda::kThreads, 0, s>>>(xp, dhp, dxp, n); break;
      case Act::kSiLU: act_backward_kernel<T, 1><<<b, cuda::kThreads, 0, s>>>(xp, dhp, dxp, n); break;
      case Act::kGELUTanh: act_backward_kernel<T, 2><<<b, cuda::kThreads, 0, s>>>(xp, dhp, dxp, n); break;
    }
  });
  cuda::check_launch("act_backward");
}

void swiglu_forward_cuda(DType dt, const void* g, const void* u, void* h, int64_t n,
                         StreamHandle stream) {
  if (n <= 0) return;
  cuda::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    swiglu_forward_kernel<T><<<cuda::blocks_for(n), cuda::kThreads, 0, cuda::as_stream(stream)>>>(
        static_cast<const T*>(g), static_cast<const T*>(u), static_cast<T*>(h), n);
  });
  cuda::check_launch("swiglu_forward");
}

void swiglu_backward_cuda(DType dt, const void* g, const void* u, const void* dh, void* dg,
                          void* du, int64_t n, StreamHandle stream) {
  if (n <= 0) return;
  cuda::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    swiglu_backward_kernel<T><<<cuda::blocks_for(n), cuda::kThreads, 0, cuda::as_stream(stream)>>>(
        static_cast<const T*>(g), static_cast<const T*>(u), static_cast<const T*>(dh),
        static_cast<T*>(dg), static_cast<T*>(du), n);
  });
  cuda::check_launch("swiglu_backward");
}

}  // namespace memfit::kernels
