// CUDA bodies of ReGELU2 / ReSiLU2 (kernels/approx_act.h). One thread per flag byte in
// forward (so no two threads write one byte, and no warp-level cooperation that tail
// threads could skip); one thread per element in backward. 64-bit indices throughout.
#include "cuda/common.cuh"
#include "kernels/approx_act.h"

namespace memfit::kernels {
namespace {

struct Levels {
  float s[4];
  float c[3];
};

template <typename T, int kAct>  // 0 GELU, 1 SiLU, 2 GELU tanh
__global__ void forward_kernel(const T* __restrict__ x, T* __restrict__ y,
                               uint8_t* __restrict__ flags, int64_t n, Levels lv) {
  const int64_t nbytes = (n + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b < nbytes;
       b += stride) {
    uint8_t byte = 0;
    for (int j = 0; j < 4; ++j) {
      const int64_t i = 4 * b + j;
      if (i >= n) break;
      const float v = cuda::to_f32(x[i]);
      y[i] = cuda::from_f32<T>(kAct == 0 ? cuda::gelu(v) : (kAct == 1 ? cuda::silu(v) : cuda::gelu_tanh(v)));
      const int f = (v > lv.c[0]) + (v > lv.c[1]) + (v > lv.c[2]);
      byte |= static_cast<uint8_t>(f << (2 * j));
    }
    flags[b] = byte;
  }
}

template <typename T>
__global__ void backward_kernel(const T* __restrict__ dy, const uint8_t* __restrict__ flags,
                                T* dx, int64_t n, Levels lv) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += stride) {
    const int code = (flags[i >> 2] >> (2 * (i & 3))) & 3;
    dx[i] = cuda::from_f32<T>(cuda::to_f32(dy[i]) * lv.s[code]);
  }
}

Levels levels(ApproxAct act) {
  const StepLevels l = step_levels(act);
  return Levels{{l.s[0], l.s[1], l.s[2], l.s[3]}, {l.c[0], l.c[1], l.c[2]}};
}

}  // namespace

void approx_act_forward_cuda(ApproxAct act, DType dt, const void* x, void* y, uint8_t* flags,
                             int64_t n, StreamHandle stream) {
  if (n <= 0) return;
  const Levels lv = levels(act);
  const unsigned int blocks = cuda::blocks_for(packed2_bytes(n));
  cuda::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const auto s = cuda::as_stream(stream);
    const T* xp = static_cast<const T*>(x);
    T* yp = static_cast<T*>(y);
    switch (act) {
      case ApproxAct::kReGELU2: forward_kernel<T, 0><<<blocks, cuda::kThreads, 0, s>>>(xp, yp, flags, n, lv); break;
      case ApproxAct::kReSiLU2: forward_kernel<T, 1><<<blocks, cuda::kThreads, 0, s>>>(xp, yp, flags, n, lv); break;
      case ApproxAct::kReGELU2Tanh: forward_kernel<T, 2><<<blocks, cuda::kThreads, 0, s>>>(xp, yp, flags, n, lv); break;
    }
  });
  cuda::check_launch("approx_act_forward");
}

void approx_act_backward_cuda(ApproxAct act, DType dt, const void* dy, const uint8_t* flags,
                              void* dx, int64_t n, StreamHandle stream) {
  if (n <= 0) return;
  const Levels lv = levels(act);
  cuda::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    backward_kernel<T><<<cuda::blocks_for(n), cuda::kThreads, 0, cuda::as_stream(stream)>>>(
        static_cast<const T*>(dy), flags, static_cast<T*>(dx), n, lv);
  });
  cuda::check_launch("approx_act_backward");
}

}  // namespace memfit::kernels
