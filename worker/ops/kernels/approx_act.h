// Approx-BP activations (shared/docs/method.md section 1): ReGELU2 and ReSiLU2.
//
// Forward is the exact GELU (erf form) or SiLU. For backward, forward keeps a 2-bit
// flag per element,
//     f = [x > c0] + [x > c1] + [x > c2]        (0..3)
// and backward is dx = dy * s[f] with s = {0, a0, a0 + a1, a0 + a1 + a2}.
//
// Flag layout (the reference code's): the flattened contiguous tensor's element i lives
// in byte i >> 2 at bits 2 * (i & 3), lowest bits first; ceil(n / 4) bytes in all.
//
// Special values (defined here, tested in tests/ops/test_approx_act.cpp):
//   x == c_k     -> not above c_k (the comparison is strict), so f counts the
//                   thresholds strictly below x;
//   +inf         -> f = 3, y = +inf;   -inf -> f = 0, y = 0 (the limit of x * cdf(x));
//   NaN          -> f = 0 (all comparisons are false), y = NaN.
#pragma once

#include <cstdint>

#include "kernels/dtype.h"

namespace memfit::kernels {

// kReGELU2Tanh: forward is the tanh approximation of GELU (GPT-2's "gelu_new"); flags
// and step levels are ReGELU2's.
enum class ApproxAct : int32_t { kReGELU2 = 0, kReSiLU2 = 1, kReGELU2Tanh = 2 };

// Fitted constants, from the paper (method.md table). Thresholds c and step levels s
// are applied in fp32: c as float, s[k] as the float nearest the double partial sum.
struct StepConstants {
  double a[3];
  double c[3];
};

inline constexpr StepConstants kReGELU2Constants{
    {-0.04922261145617846, 1.0979632065417297, -0.048740595085551286},
    {-3.1858810036855245, -0.001178821281161997, 3.190832613414926}};
inline constexpr StepConstants kReSiLU2Constants{
    {-0.04060357190528599, 1.080925428529668, -0.040321856624382146},
    {-6.3050461001646445, -0.0008684942046214787, 6.325815242089708}};

inline constexpr const StepConstants& step_constants(ApproxAct act) {
  return act == ApproxAct::kReSiLU2 ? kReSiLU2Constants : kReGELU2Constants;
}

// Step levels s[0..3] in fp32.
struct StepLevels {
  float s[4];
  float c[3];
};
inline StepLevels step_levels(ApproxAct act) {
  const StepConstants& k = step_constants(act);
  return StepLevels{{0.0f, static_cast<float>(k.a[0]), static_cast<float>(k.a[0] + k.a[1]),
                     static_cast<float>(k.a[0] + k.a[1] + k.a[2])},
                    {static_cast<float>(k.c[0]), static_cast<float>(k.c[1]),
                     static_cast<float>(k.c[2])}};
}

// Bytes of packed 2-bit flags for n elements.
inline constexpr int64_t packed2_bytes(int64_t n) { return (n + 3) / 4; }

// x: [n] contiguous, y: [n] same dtype, flags: [packed2_bytes(n)].
void approx_act_forward_cpu(ApproxAct act, DType dt, const void* x, void* y, uint8_t* flags,
                            int64_t n);
// dy: [n], flags: [packed2_bytes(n)] -> dx: [n] (dy's dtype). dx may alias dy.
void approx_act_backward_cpu(ApproxAct act, DType dt, const void* dy, const uint8_t* flags,
                             void* dx, int64_t n);

void approx_act_forward_cuda(ApproxAct act, DType dt, const void* x, void* y, uint8_t* flags,
                             int64_t n, StreamHandle stream);
void approx_act_backward_cuda(ApproxAct act, DType dt, const void* dy, const uint8_t* flags,
                              void* dx, int64_t n, StreamHandle stream);

}  // namespace memfit::kernels
