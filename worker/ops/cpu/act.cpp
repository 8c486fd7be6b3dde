// CPU bodies of the exact activations used by the recompute-in-backward MLP pieces
// (kernels/act.h).
#include "kernels/act.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/common.h"

namespace memfit::kernels {
namespace {

// Elementwise loops write straight through (no fp32 staging buffer: measured slower).
template <typename Body>
void for_range(int64_t n, Body&& body) {
  at::parallel_for(0, n, cpu::kGrain, [&](int64_t a, int64_t b) { body(a, b); });
}

// kAct: the Act enum's value (0 GELU, 1 SiLU, 2 GELU tanh).
template <int kAct>
inline float act_value(float v) {
  return kAct == 0 ? cpu::gelu_f32(v) : (kAct == 1 ? cpu::silu_f32(v) : cpu::gelu_tanh_f32(v));
}
template <int kAct>
inline float act_grad(float v) {
  return kAct == 0 ? cpu::gelu_grad_f32(v) : (kAct == 1 ? cpu::silu_grad_f32(v) : cpu::gelu_tanh_grad_f32(v));
}

template <typename T, int kAct>
void act_forward_impl(const T* x, T* h, int64_t n) {
  for_range(n, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) h[i] = cpu::from_f32<T>(act_value<kAct>(cpu::to_f32(x[i])));
  });
}

template <typename T, int kAct>
void act_backward_impl(const T* x, const T* dh, T* dx, int64_t n) {
  for_range(n, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      dx[i] = cpu::from_f32<T>(cpu::to_f32(dh[i]) * act_grad<kAct>(cpu::to_f32(x[i])));
    }
  });
}

template <typename T>
void swiglu_forward_impl(const T* g, const T* u, T* h, int64_t n) {
  for_range(n, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      h[i] = cpu::from_f32<T>(cpu::silu_f32(cpu::to_f32(g[i])) * cpu::to_f32(u[i]));
    }
  });
}

template <typename T>
void swiglu_backward_impl(const T* g, const T* u, const T* dh, T* dg, T* du, int64_t n) {
  for_range(n, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const float x = cpu::to_f32(g[i]);
      const float d = cpu::to_f32(dh[i]);
      const float s = cpu::sigmoid_f32(x);
      const float silu = x < -120.0f ? -0.0f : x * s;
      const float dsilu = x > 120.0f ? 1.0f : (x < -120.0f ? 0.0f : s * (1.0f + x * (1.0f - s)));
      dg[i] = cpu::from_f32<T>(d * cpu::to_f32(u[i]) * dsilu);
      du[i] = cpu::from_f32<T>(d * silu);
    }
  });
}

}  // namespace

void act_forward_cpu(Act act, DType dt, const void* x, void* h, int64_t n) {
  if (n <= 0) return;
  cpu::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    T* hp = static_cast<T*>(h);
    switch (act) {
      case Act::kGELU: act_forward_impl<T, 0>(xp, hp, n); break;
      case Act::kSiLU: act_forward_impl<T, 1>(xp, hp, n); break;
      case Act::kGELUTanh: act_forward_impl<T, 2>(xp, hp, n); break;
    }
  });
}

void act_backward_cpu(Act act, DType dt, const void* x, const void* dh, void* dx, int64_t n) {
  if (n <= 0) return;
  cpu::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    const T* dhp = static_cast<const T*>(dh);
    T* dxp = static_cast<T*>(dx);
    switch (act) {
      case Act::kGELU: act_backward_impl<T, 0>(xp, dhp, dxp, n); break;
      case Act::kSiLU: act_backward_impl<T, 1>(xp, dhp, dxp, n); break;
      case Act::kGELUTanh: act_backward_impl<T, 2>(xp, dhp, dxp, n); break;
    }
  });
}

void swiglu_forward_cpu(DType dt, const void* g, const void* u, void* h, int64_t n) {
  if (n <= 0) return;
  cpu::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    swiglu_forward_impl<T>(static_cast<const T*>(g), static_cast<const T*>(u), static_cast<T*>(h),
                           n);
  });
}

void swiglu_backward_cpu(DType dt, const void* g, const void* u, const void* dh, void* dg,
                         void* du, int64_t n) {
  if (n <= 0) return;
  cpu::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    swiglu_backward_impl<T>(static_cast<const T*>(g), static_cast<const T*>(u),
                            static_cast<const T*>(dh), static_cast<T*>(dg), static_cast<T*>(du),
                            n);
  });
}

}  // namespace memfit::kernels
