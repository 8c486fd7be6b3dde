// CPU bodies of the exact activations used by the recompute-in-backward MLP pieces
// (kernels/act.h).
#include "kernels/act.h"

#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu/common.h"

namespace memfit::kernels {
namespace {

// Runs body(i0, len, fx...) over blocks of kBlock elements in parallel.
template <typename Body>
void for_blocks(int64_t n, Body&& body) {
  at::parallel_for(0, n, cpu::kGrain, [&](int64_t a, int64_t b) {
    for (int64_t i0 = a; i0 < b; i0 += cpu::kBlock) body(i0, std::min(cpu::kBlock, b - i0));
  });
}

template <typename T, bool kGelu>
void act_forward_impl(const T* x, T* h, int64_t n) {
  for_blocks(n, [&](int64_t i0, int64_t len) {
    float v[cpu::kBlock];
    for (int64_t j = 0; j < len; ++j) v[j] = cpu::to_f32(x[i0 + j]);
    for (int64_t j = 0; j < len; ++j) v[j] = kGelu ? cpu::gelu_f32(v[j]) : cpu::silu_f32(v[j]);
    for (int64_t j = 0; j < len; ++j) h[i0 + j] = cpu::from_f32<T>(v[j]);
  });
}

template <typename T, bool kGelu>
void act_backward_impl(const T* x, const T* dh, T* dx, int64_t n) {
  for_blocks(n, [&](int64_t i0, int64_t len) {
    float v[cpu::kBlock];
    float g[cpu::kBlock];
    for (int64_t j = 0; j < len; ++j) {
      v[j] = cpu::to_f32(x[i0 + j]);
      g[j] = cpu::to_f32(dh[i0 + j]);
    }
    for (int64_t j = 0; j < len; ++j) {
      g[j] *= kGelu ? cpu::gelu_grad_f32(v[j]) : cpu::silu_grad_f32(v[j]);
    }
    for (int64_t j = 0; j < len; ++j) dx[i0 + j] = cpu::from_f32<T>(g[j]);
  });
}

template <typename T>
void swiglu_forward_impl(const T* g, const T* u, T* h, int64_t n) {
  for_blocks(n, [&](int64_t i0, int64_t len) {
    float v[cpu::kBlock];
    for (int64_t j = 0; j < len; ++j) v[j] = cpu::to_f32(g[i0 + j]);
    for (int64_t j = 0; j < len; ++j) v[j] = cpu::silu_f32(v[j]) * cpu::to_f32(u[i0 + j]);
    for (int64_t j = 0; j < len; ++j) h[i0 + j] = cpu::from_f32<T>(v[j]);
  });
}

template <typename T>
void swiglu_backward_impl(const T* g, const T* u, const T* dh, T* dg, T* du, int64_t n) {
  for_blocks(n, [&](int64_t i0, int64_t len) {
    float gv[cpu::kBlock], uv[cpu::kBlock], hv[cpu::kBlock];
    for (int64_t j = 0; j < len; ++j) {
      gv[j] = cpu::to_f32(g[i0 + j]);
      uv[j] = cpu::to_f32(u[i0 + j]);
      hv[j] = cpu::to_f32(dh[i0 + j]);
    }
    for (int64_t j = 0; j < len; ++j) {
      const float x = gv[j];
      const float s = cpu::sigmoid_f32(x);
      const float silu = x < -120.0f ? -0.0f : x * s;
      const float dsilu = x > 120.0f ? 1.0f : (x < -120.0f ? 0.0f : s * (1.0f + x * (1.0f - s)));
      gv[j] = hv[j] * uv[j] * dsilu;  // dg
      uv[j] = hv[j] * silu;           // du
    }
    for (int64_t j = 0; j < len; ++j) {
      dg[i0 + j] = cpu::from_f32<T>(gv[j]);
      du[i0 + j] = cpu::from_f32<T>(uv[j]);
    }
  });
}

}  // namespace

void act_forward_cpu(Act act, DType dt, const void* x, void* h, int64_t n) {
  if (n <= 0) return;
  cpu::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    if (act == Act::kGELU) {
      act_forward_impl<T, true>(static_cast<const T*>(x), static_cast<T*>(h), n);
    } else {
      act_forward_impl<T, false>(static_cast<const T*>(x), static_cast<T*>(h), n);
    }
  });
}

void act_backward_cpu(Act act, DType dt, const void* x, const void* dh, void* dx, int64_t n) {
  if (n <= 0) return;
  cpu::dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x);
    const T* dhp = static_cast<const T*>(dh);
    if (act == Act::kGELU) {
      act_backward_impl<T, true>(xp, dhp, static_cast<T*>(dx), n);
    } else {
      act_backward_impl<T, false>(xp, dhp, static_cast<T*>(dx), n);
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
