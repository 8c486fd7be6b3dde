// Forward and backward arithmetic of a linear layer with an optional LoRA branch,
// shared by the linear op and the fused MLP tails (which recompute the layer's input
// in backward). Plain ATen, no autograd: callers decide what is kept.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <vector>

#include "ops.h"

namespace memfit::ops::detail {

using OptTensor = c10::optional<at::Tensor>;
inline OptTensor opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : OptTensor(); }
inline at::Tensor val(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }

// LinearWeights from the (optional) tensors an autograd Function receives.
inline LinearWeights make_weights(const at::Tensor& weight, const OptTensor& bias,
                                  const OptTensor& lora_a, const OptTensor& lora_b,
                                  const OptTensor& in_scale, const OptTensor& in_shift,
                                  double lora_scale, double lora_dropout) {
  return LinearWeights{weight,     val(bias),    val(lora_a),   val(lora_b),
                       lora_scale, lora_dropout, val(in_scale), val(in_shift)};
}

// Saves `front` (the tensors a Function keeps itself), then w's six tensors and the
// LoRA dropout mask; restore_weights(ctx, saved, front.size()) gives w back and the mask
// is saved[front.size() + 6]. The weights are parameters: keeping them costs no memory.
template <typename Ctx>
void save_weights(Ctx* ctx, std::vector<at::Tensor> front, const LinearWeights& w,
                  const at::Tensor& mask) {
  for (const at::Tensor* t : {&w.weight, &w.bias, &w.lora_a, &w.lora_b, &w.lora_in_scale,
                              &w.lora_in_shift, &mask}) {
    front.push_back(*t);
  }
  ctx->save_for_backward(front);
  ctx->saved_data["lora_scale"] = w.lora_scale;
  ctx->saved_data["lora_dropout"] = w.lora_dropout;
}

template <typename Ctx>
LinearWeights restore_weights(Ctx* ctx, const std::vector<at::Tensor>& s, size_t first) {
  return LinearWeights{s[first],     s[first + 1], s[first + 2],
                       s[first + 3], ctx->saved_data["lora_scale"].toDouble(),
                       ctx->saved_data["lora_dropout"].toDouble(),
                       s[first + 4], s[first + 5]};
}

// Validates w against an input with `in_features` features; `op` names the caller.
void check_linear_weights(const char* op, const at::Tensor& x, const LinearWeights& w);

bool has_lora(const LinearWeights& w);
// Whether backward needs the layer's input (W or a LoRA factor needs a gradient).
bool needs_input_for_backward(const LinearWeights& w);
// Whether LoRA dropout is active for this call.
bool lora_dropout_active(const LinearWeights& w, bool training);

// y = x W^T + b + scale * drop(x') A^T B^T. If LoRA dropout is active, *mask receives the
// 1-bit mask (kernels/dropout_bits.h layout) drawn for drop().
at::Tensor linear_forward(const at::Tensor& x, const LinearWeights& w, bool training,
                          at::Tensor* mask);

struct LinearGrads {
  at::Tensor dx, dweight, dbias, dlora_a, dlora_b;
};
struct LinearNeeds {
  bool dx = true, dweight = false, dbias = false, dlora_a = false, dlora_b = false;
};
// Which weight gradients a custom autograd Function must produce. `weight_edge` is the
// autograd input index of `weight`; optional inputs that are undefined take no index,
// so bias and the LoRA factors follow it only when present. needs_input_grad is asked
// by edge index, not by argument position.
template <typename Ctx>
LinearNeeds weight_needs(Ctx* ctx, const LinearWeights& w, size_t weight_edge) {
  LinearNeeds needs;
  size_t e = weight_edge;
  needs.dweight = ctx->needs_input_grad(e++);
  if (w.bias.defined()) needs.dbias = ctx->needs_input_grad(e++);
  if (w.lora_a.defined()) {
    needs.dlora_a = ctx->needs_input_grad(e++);
    needs.dlora_b = ctx->needs_input_grad(e++);
  }
  return needs;
}

// x may be undefined when needs asks for no weight or LoRA gradient; it is taken by
// value and dropped as soon as the weight gradients are done (pass std::move(x) to let
// a recomputed input go before the input gradient is allocated). mask is the one forward
// produced (undefined without dropout).
LinearGrads linear_backward(at::Tensor x, const at::Tensor& dy, const LinearWeights& w,
                            const at::Tensor& mask, const LinearNeeds& needs);

}  // namespace memfit::ops::detail
