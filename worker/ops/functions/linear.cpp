// memfit::ops::linear: the memory-sharing linear layer with an optional LoRA branch.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "functions/linear_core.h"
#include "ops.h"

namespace memfit::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using detail::opt;
using detail::OptTensor;

struct LinearFn : public torch::autograd::Function<LinearFn> {
  // Keeps: x itself iff W or a LoRA factor needs a gradient; the 1-bit LoRA dropout mask
  // when dropout is active. The weights are parameters and cost nothing to keep.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const OptTensor& bias, const OptTensor& lora_a,
                            const OptTensor& lora_b, const OptTensor& in_scale,
                            const OptTensor& in_shift, double lora_scale, double lora_dropout,
                            bool training) {
    const LinearWeights w = detail::make_weights(weight, bias, lora_a, lora_b, in_scale, in_shift,
                                                 lora_scale, lora_dropout);
    at::Tensor mask;
    at::Tensor y = detail::linear_forward(x, w, training, &mask);
    const at::Tensor kept = detail::needs_input_for_backward(w) ? x : at::Tensor();
    detail::save_weights(ctx, {kept}, w, mask);
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const LinearWeights w = detail::restore_weights(ctx, s, 1);
    detail::LinearNeeds needs = detail::weight_needs(ctx, w, 1);
    needs.dx = ctx->needs_input_grad(0);
    const detail::LinearGrads g = detail::linear_backward(s[0], grads[0], w, s[7], needs);
    return {g.dx,       g.dweight,    g.dbias,      g.dlora_a,    g.dlora_b,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor linear(const at::Tensor& x, const LinearWeights& w, bool training) {
  TORCH_CHECK(x.defined(), "memfit::ops::linear: input is undefined");
  detail::check_linear_weights("memfit::ops::linear", x, w);
  return LinearFn::apply(x, w.weight, opt(w.bias), opt(w.lora_a), opt(w.lora_b),
                         opt(w.lora_in_scale), opt(w.lora_in_shift), w.lora_scale,
                         w.lora_dropout, training);
}

}  // namespace memfit::ops
