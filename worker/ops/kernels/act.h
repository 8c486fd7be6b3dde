// Exact elementwise activations for the recompute-in-backward pieces (fused MLP):
//   GELU  h = x * Phi(x)             dh/dx = Phi(x) + x * phi(x)
//   SiLU  h = x * sigmoid(x)         dh/dx = sig(x) * (1 + x * (1 - sig(x)))
//   SwiGLU h = silu(g) * u           dg = dh * u * silu'(g),  du = dh * silu(g)
// These keep nothing themselves; the autograd function that uses them keeps the
// pre-activation(s) and calls the forward again in backward.
#pragma once

#include <cstdint>

#include "kernels/dtype.h"

namespace memfit::kernels {

// kGELUTanh: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).
enum class Act : int32_t { kGELU = 0, kSiLU = 1, kGELUTanh = 2 };

// x: [n] -> h: [n].
void act_forward_cpu(Act act, DType dt, const void* x, void* h, int64_t n);
// x, dh: [n] -> dx: [n]. dx may alias dh.
void act_backward_cpu(Act act, DType dt, const void* x, const void* dh, void* dx, int64_t n);
// g, u: [n] -> h: [n].
void swiglu_forward_cpu(DType dt, const void* g, const void* u, void* h, int64_t n);
// g, u, dh: [n] -> dg, du: [n]. dg may alias dh.
void swiglu_backward_cpu(DType dt, const void* g, const void* u, const void* dh, void* dg,
                         void* du, int64_t n);

void act_forward_cuda(Act act, DType dt, const void* x, void* h, int64_t n, StreamHandle stream);
void act_backward_cuda(Act act, DType dt, const void* x, const void* dh, void* dx, int64_t n,
                       StreamHandle stream);
void swiglu_forward_cuda(DType dt, const void* g, const void* u, void* h, int64_t n,
                         StreamHandle stream);
void swiglu_backward_cuda(DType dt, const void* g, const void* u, const void* dh, void* dg,
                          void* du, int64_t n, StreamHandle stream);

}  // namespace memfit::kernels
