// The one place where a tensor op picks its kernel body: CPU (cpu/*.cpp) or CUDA
// (cuda/*.cu, only in MEMFIT_CUDA builds). Callers pass contiguous tensors that they
// allocated with the right sizes; this file checks devices and dtypes and passes raw
// pointers on. Internal to worker/ops.
#pragma once

#include <ATen/core/Tensor.h>

#include "kernels/act.h"
#include "kernels/approx_act.h"
#include "kernels/attention_rows.h"
#include "kernels/dtype.h"
#include "kernels/ms_norm.h"

namespace memfit::ops::detail {

// The kernel storage type of t, or a c10::Error naming `op` if t is not float32,
// bfloat16 or float16.
kernels::DType kernel_dtype(const at::Tensor& t, const char* op);

// Checks that t lives on a device memfit has kernels for in this build: CPU always,
// CUDA only in MEMFIT_CUDA builds. Throws a c10::Error naming `op` otherwise.
void check_device(const at::Tensor& t, const char* op);

// Checks that every tensor in `ts` is on the same device as the first and has its dtype.
void check_same(const char* op, std::initializer_list<std::reference_wrapper<const at::Tensor>> ts,
                std::initializer_list<const char*> names);

void approx_act_forward(kernels::ApproxAct act, const at::Tensor& x, const at::Tensor& y,
                        const at::Tensor& flags);
void approx_act_backward(kernels::ApproxAct act, const at::Tensor& dy, const at::Tensor& flags,
                         const at::Tensor& dx);

void ms_norm_forward(kernels::NormKind kind, const at::Tensor& x, const at::Tensor& y,
                     const at::Tensor& rstd, double eps);
void ms_norm_backward(kernels::NormKind kind, const at::Tensor& dy, const at::Tensor& y,
                      const at::Tensor& rstd, const at::Tensor& dx);

// scale: kernels::dropout_scale(p), the same float for forward, backward and replays.
void dropout_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& mask, double p,
                     float scale, uint64_t seed);
void dropout_apply(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& y, float scale);

void act_forward(kernels::Act act, const at::Tensor& x, const at::Tensor& h);
void act_backward(kernels::Act act, const at::Tensor& x, const at::Tensor& dh, const at::Tensor& dx);
void swiglu_forward(const at::Tensor& g, const at::Tensor& u, const at::Tensor& h);
void swiglu_backward(const at::Tensor& g, const at::Tensor& u, const at::Tensor& dh,
                     const at::Tensor& dg, const at::Tensor& du);

// Attention row kernels; s, lse, dp, p, delta are fp32 on one device.
void attention_softmax_forward(const kernels::AttentionRows& g, const at::Tensor& s,
                               const at::Tensor& lse);
void attention_probs(const kernels::AttentionRows& g, const at::Tensor& s, const at::Tensor& lse);
void attention_dscores(const kernels::AttentionRows& g, const at::Tensor& dp, const at::Tensor& p,
                       const at::Tensor& delta);

// CPU only: regrouping between [B, S, H, D] (t, any strides with D contiguous) and
// heads-major fp32 blocks (kernels/attention_rows.h).
// With dot_with (same sizes and strides as t) and dot ([rows] fp32) defined, also
// writes the row dot products of t and dot_with.
void attention_gather(const at::Tensor& t, const kernels::HeadsLayout& l, double scale,
                      const at::Tensor& out, const at::Tensor& dot_with = {},
                      const at::Tensor& dot = {});
void attention_scatter(const at::Tensor& block, const kernels::HeadsLayout& l, double scale,
                       const at::Tensor& t);

}  // namespace memfit::ops::detail
