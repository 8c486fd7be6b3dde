// CUDA bodies of the exact activations used by the fused MLP tails (kernels/act.h).
#include "cuda/common.cuh"
#include "kernels/act.h"

namespace memfit::kernels {
namespace {

#define MEMFIT_GRID_STRIDE(i, n)                                                         \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

template <typename T, bool kGelu>
__global__ void act_forward_kernel(const T* __restrict__ x, T* __restrict__ h, int64_t n) {
  MEMFIT_GRID_STRIDE(i, n) {
    const float v = cuda::to_f32(x[i]);
    h[i] = cuda::from_f32<T>(kGelu ? cuda::gelu(v) : cuda::silu(v));
  }
}

template <typename T, bool kGelu>
__global__ void act_backward_kernel(const T* __restrict__ x, const T* dh, T* dx, int64_t n) {
  MEMFIT_GRID_STRIDE(i, n) {
    const float v = cuda::to_f32(x[i]);
    const float d = kGelu ? cuda::gelu_grad(v) : cuda::silu_grad(v);
    dx[i] = cuda::from_f32<T>(cuda::to_f32(dh[i]) * d);
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
    if (act == Act::kGELU) {
      act_forward_kernel<T, true><<<cuda::blocks_for(n), cuda::kThreads, 0, s>>>(
          static_cast<const T*>(x), static_cast<T*>(h), n);
    } else {
      act_forward_kernel<T, false><<<cuda::blocks_for(n), cuda::kThreads, 0, s>>>(
          static_cast<const T*>(x), static_cast<T*>(h), n);
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
    if (act == Act::kGELU) {
      act_backward_kernel<T, true><<<cuda::blocks_for(n), cuda::kThreads, 0, s>>>(
          static_cast<const T*>(x), static_cast<const T*>(dh), static_cast<T*>(dx), n);
    } else {
      act_backward_kernel<T, false><<<cuda::blocks_for(n), cuda::kThreads, 0, s>>>(
          static_cast<const T*>(x), static_cast<const T*>(dh), static_cast<T*>(dx), n);
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
