// memfit::ops::act_linear / swiglu_linear: MLP tails that keep the pre-activation(s)
// and recompute the activation in backward (shared/docs/method.md section 4).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "dispatch.h"
#include "functions/linear_core.h"
#include "ops.h"

namespace memfit::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using detail::opt;
using detail::OptTensor;
namespace k = memfit::kernels;

at::Tensor act_forward(k::Act act, const at::Tensor& z) {
  const at::Tensor zc = z.contiguous();
  at::Tensor h = at::empty(zc.sizes(), zc.options());
  detail::act_forward(act, zc, h);
  return h;
}

at::Tensor swiglu_forward(const at::Tensor& g, const at::Tensor& u) {
  const at::Tensor gc = g.contiguous(), uc = u.contiguous();
  at::Tensor h = at::empty(gc.sizes(), gc.options());
  detail::swiglu_forward(gc, uc, h);
  return h;
}

struct ActLinearFn : public torch::autograd::Function<ActLinearFn> {
  // Keeps: z (the pre-activation, as given) and a LoRA dropout mask if active.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& z, const at::Tensor& weight,
                            const OptTensor& bias, const OptTensor& lora_a,
                            const OptTensor& lora_b, const OptTensor& in_scale,
                            const OptTensor& in_shift, double lora_scale, double lora_dropout,
                            bool training, int64_t act) {
    const LinearWeights w = detail::make_weights(weight, bias, lora_a, lora_b, in_scale, in_shift,
                                                 lora_scale, lora_dropout);
    at::Tensor mask;
    at::Tensor out;
    {
      const at::Tensor h = act_forward(static_cast<k::Act>(act), z);  // freed on return
      out = detail::linear_forward(h, w, training, &mask);
    }
    detail::save_weights(ctx, {z}, w, mask);
    ctx->saved_data["act"] = act;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor& z = s[0];
    const auto act = static_cast<k::Act>(ctx->saved_data["act"].toInt());
    const LinearWeights w = detail::restore_weights(ctx, s, 1);
    const detail::LinearNeeds needs = detail::weight_needs(ctx, w, 1);
    at::Tensor h;
    if (detail::needs_input_for_backward(w)) h = act_forward(act, z);
    detail::LinearGrads g = detail::linear_backward(std::move(h), grads[0], w, s[7], needs);
    const at::Tensor zc = z.contiguous();
    // dh is a fresh buffer of linear_backward's: dz overwrites it in place, so backward
    // holds one [T, I] gradient less at its peak.
    const at::Tensor dz = g.dx.contiguous();
    detail::act_backward(act, zc, dz, dz);
    return {dz,           g.dweight,    g.dbias,      g.dlora_a,    g.dlora_b,   at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct SwiGLULinearFn : public torch::autograd::Function<SwiGLULinearFn> {
  // Keeps: g and u (as given) and a LoRA dropout mask if active.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& g, const at::Tensor& u,
                            const at::Tensor& weight, const OptTensor& bias,
                            const OptTensor& lora_a, const OptTensor& lora_b,
                            const OptTensor& in_scale, const OptTensor& in_shift,
                            double lora_scale, double lora_dropout, bool training) {
    const LinearWeights w = detail::make_weights(weight, bias, lora_a, lora_b, in_scale, in_shift,
                                                 lora_scale, lora_dropout);
    at::Tensor mask;
    at::Tensor out;
    {
      const at::Tensor h = swiglu_forward(g, u);
      out = detail::linear_forward(h, w, training, &mask);
    }
    detail::save_weights(ctx, {g, u}, w, mask);
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const LinearWeights w = detail::restore_weights(ctx, s, 2);
    const detail::LinearNeeds needs = detail::weight_needs(ctx, w, 2);
    const at::Tensor gc = s[0].contiguous(), uc = s[1].contiguous();
    at::Tensor h;
    if (detail::needs_input_for_backward(w)) h = swiglu_forward(gc, uc);
    detail::LinearGrads lg = detail::linear_backward(std::move(h), grads[0], w, s[8], needs);
    // dg overwrites dh in place (the kernel reads each dh element before writing it).
    const at::Tensor dg = lg.dx.contiguous();
    at::Tensor du = at::empty(uc.sizes(), uc.options());
    detail::swiglu_backward(gc, uc, dg, dg, du);
    return {dg,           du,           lg.dweight,   lg.dbias,     lg.dlora_a,   lg.dlora_b,
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor act_linear(MlpAct act, const at::Tensor& z, const LinearWeights& down, bool training) {
  const char* op = "memfit::ops::act_linear";
  TORCH_CHECK(z.defined(), op, ": input is undefined");
  detail::check_linear_weights(op, z, down);
  const k::Act kact = act == MlpAct::kGELU ? k::Act::kGELU
                      : act == MlpAct::kSiLU ? k::Act::kSiLU
                                             : k::Act::kGELUTanh;
  const int64_t code = static_cast<int64_t>(kact);
  return ActLinearFn::apply(z, down.weight, opt(down.bias), opt(down.lora_a), opt(down.lora_b),
                            opt(down.lora_in_scale), opt(down.lora_in_shift), down.lora_scale,
                            down.lora_dropout, training, code);
}

at::Tensor swiglu_linear(const at::Tensor& g, const at::Tensor& u, const LinearWeights& down,
                         bool training) {
  const char* op = "memfit::ops::swiglu_linear";
  TORCH_CHECK(g.defined() && u.defined(), op, ": gate or up input is undefined");
  TORCH_CHECK(g.sizes() == u.sizes(), op, ": gate ", g.sizes(), " and up ", u.sizes(),
              " must have the same shape");
  detail::check_linear_weights(op, g, down);
  detail::check_same(op, {g, u}, {"gate", "up"});
  return SwiGLULinearFn::apply(g, u, down.weight, opt(down.bias), opt(down.lora_a),
                               opt(down.lora_b), opt(down.lora_in_scale),
                               opt(down.lora_in_shift), down.lora_scale, down.lora_dropout,
                               training);
}

}  // namespace memfit::ops
