// memfit::ops::regelu2 / resilu2 (kernels/approx_act.h).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "dispatch.h"
#include "ops.h"

namespace memfit::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
namespace k = memfit::kernels;

template <k::ApproxAct kAct>
struct ApproxActFn : public torch::autograd::Function<ApproxActFn<kAct>> {
  // Keeps: flags [ceil(numel / 4)] uint8, nothing else.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x) {
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty(xc.sizes(), xc.options());
    at::Tensor flags = at::empty({k::packed2_bytes(xc.numel())}, xc.options().dtype(at::kByte));
    detail::approx_act_forward(kAct, xc, y, flags);
    ctx->save_for_backward({flags});
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor flags = ctx->get_saved_variables()[0];
    const at::Tensor dy = grads[0].contiguous();
    at::Tensor dx = at::empty(dy.sizes(), dy.options());
    detail::approx_act_backward(kAct, dy, flags, dx);
    return {dx};
  }
};

void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.defined(), op, ": input is undefined");
  detail::check_device(x, op);
  detail::kernel_dtype(x, op);
}

}  // namespace

at::Tensor regelu2(const at::Tensor& x) {
  check_input(x, "memfit::ops::regelu2");
  return ApproxActFn<k::ApproxAct::kReGELU2>::apply(x);
}

at::Tensor regelu2_tanh(const at::Tensor& x) {
  check_input(x, "memfit::ops::regelu2_tanh");
  return ApproxActFn<k::ApproxAct::kReGELU2Tanh>::apply(x);
}

at::Tensor resilu2(const at::Tensor& x) {
  check_input(x, "memfit::ops::resilu2");
  return ApproxActFn<k::ApproxAct::kReSiLU2>::apply(x);
}

}  // namespace memfit::ops
