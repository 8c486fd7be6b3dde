// Helpers shared by the CPU kernel bodies: element conversion, dtype dispatch and
// branch-free fp32 math that GCC vectorizes (the kernels are compiled with -O3 and, by
// default, -march=native; see worker/CMakeLists.txt).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "kernels/dtype.h"

namespace memfit::kernels::cpu {

// ---- element conversion (compute is always fp32) ----
inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_f32(c10::Half v) { return static_cast<float>(v); }

template <typename T>
inline T from_f32(float f);
template <>
inline float from_f32<float>(float f) { return f; }
template <>
inline c10::BFloat16 from_f32<c10::BFloat16>(float f) {
  // Round to nearest even, NaN -> canonical quiet NaN (as c10::BFloat16 does).
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  const uint32_t rounded = bits + 0x7FFFu + ((bits >> 16) & 1u);
  c10::BFloat16 out;
  out.x = (f != f) ? static_cast<uint16_t>(0x7FC0) : static_cast<uint16_t>(rounded >> 16);
  return out;
}
template <>
inline c10::Half from_f32<c10::Half>(float f) { return c10::Half(f); }

// Calls fn(T{}) with T the storage type for dt.
template <typename Fn>
inline void dispatch_dtype(DType dt, Fn&& fn) {
  switch (dt) {
    case DType::kFloat32: fn(float{}); return;
    case DType::kBFloat16: fn(c10::BFloat16{}); return;
    case DType::kFloat16: fn(c10::Half{}); return;
  }
}

// ---- branch-free fp32 math ----
inline float bits_to_f32(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// e^x with ~1 ulp error over the whole float range: 0 below -104, +inf above 89,
// NaN kept. Cody-Waite reduction to |r| <= ln2/2 and a degree-7 Taylor polynomial;
// 2^n applied in two halves so that subnormal and overflowing results come out right.
inline float exp_f32(float x) {
  float xc = x > -104.0f ? x : -104.0f;  // also maps NaN to -104 (fixed below)
  xc = xc < 89.0f ? xc : 89.0f;
  const float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float n = (xc * 1.4426950408889634f + shifter) - shifter;
  float r = xc - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni / 2;
  const int32_t n2 = ni - n1;
  const float s1 = bits_to_f32(static_cast<uint32_t>(n1 + 127) << 23);
  const float s2 = bits_to_f32(static_cast<uint32_t>(n2 + 127) << 23);
  const float y = p * s1 * s2;
  return x != x ? x : y;
}

// erfc(x) with relative error ~1.2e-7 everywhere, including the far tail where
// 1 - erf(x) would cancel (Chebyshev fit, Numerical Recipes' erfcc).
inline float erfc_f32(float x) {
  const float z = x < 0.0f ? -x : x;
  const float t = 1.0f / (1.0f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const float ans = t * exp_f32(p - z * z);
  return x >= 0.0f ? ans : 2.0f - ans;
}

// Exact GELU, y = x * Phi(x) = 0.5 x erfc(-x / sqrt 2); GELU(-inf) = -0.
inline float gelu_f32(float x) {
  const float y = 0.5f * x * erfc_f32(-0.70710678118654752f * x);
  return x < -40.0f ? -0.0f : y;
}
// d GELU / dx = Phi(x) + x phi(x).
inline float gelu_grad_f32(float x) {
  const float cdf = 0.5f * erfc_f32(-0.70710678118654752f * x);
  const float pdf = 0.3989422804014327f * exp_f32(-0.5f * x * x);
  const float d = cdf + x * pdf;
  return x > 40.0f ? 1.0f : (x < -40.0f ? 0.0f : d);
}
inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }
// tanh-approximated GELU: 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3);
// 1 + tanh(u) = 2 sigmoid(2u).
inline float gelu_tanh_f32(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  const float y = x * sigmoid_f32(2.0f * u);
  return x < -40.0f ? -0.0f : (x > 40.0f ? x : y);
}
inline float gelu_tanh_grad_f32(float x) {
  const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
  const float s = sigmoid_f32(2.0f * u);  // (1 + tanh u) / 2
  const float dtanh = 4.0f * s * (1.0f - s);  // 1 - tanh(u)^2
  const float d = s + 0.5f * x * dtanh * 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x * x);
  return x > 40.0f ? 1.0f : (x < -40.0f ? 0.0f : d);
}
// Exact SiLU, y = x sigmoid(x); SiLU(-inf) = -0.
inline float silu_f32(float x) {
  const float y = x * sigmoid_f32(x);
  return x < -120.0f ? -0.0f : y;
}
inline float silu_grad_f32(float x) {
  const float s = sigmoid_f32(x);
  const float d = s * (1.0f + x * (1.0f - s));
  return x > 120.0f ? 1.0f : (x < -120.0f ? 0.0f : d);
}

// Elements per inner block: loops convert a block to fp32, compute, and store, so that
// the compute loop is a plain vectorizable loop over floats.
inline constexpr int64_t kBlock = 256;
// Grain for at::parallel_for over elements: below this a loop runs on one thread.
inline constexpr int64_t kGrain = 1 << 15;

}  // namespace memfit::kernels::cpu
