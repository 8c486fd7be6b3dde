// memfit::ops::ms_layer_norm / ms_rms_norm (kernels/ms_norm.h).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include "dispatch.h"
#include "ops.h"

namespace memfit::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
namespace k = memfit::kernels;

template <k::NormKind kKind>
struct MsNormFn : public torch::autograd::Function<MsNormFn<kKind>> {
  // Keeps: the output y (returned, so shared with whoever keeps it next) and
  // rstd [rows] fp32.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double eps) {
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty(xc.sizes(), xc.options());
    const int64_t cols = xc.size(-1);
    const int64_t rows = cols == 0 ? 0 : xc.numel() / cols;
    at::Tensor rstd = at::empty({rows}, xc.options().dtype(at::kFloat));
    detail::ms_norm_forward(kKind, xc, y, rstd, eps);
    ctx->save_for_backward({y, rstd});
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor dy = grads[0].contiguous();
    at::Tensor dx = at::empty(dy.sizes(), dy.options());
    detail::ms_norm_backward(kKind, dy, saved[0], saved[1], dx);
    return {dx, at::Tensor()};
  }
};

void check_input(const at::Tensor& x, double eps, const char* op) {
  TORCH_CHECK(x.defined(), op, ": input is undefined");
  TORCH_CHECK(x.dim() >= 1, op, ": input must have at least one dimension (the normalized one)");
  detail::check_device(x, op);
  detail::kernel_dtype(x, op);
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
}

}  // namespace

at::Tensor ms_layer_norm(const at::Tensor& x, double eps) {
  check_input(x, eps, "memfit::ops::ms_layer_norm");
  return MsNormFn<k::NormKind::kLayerNorm>::apply(x, eps);
}

at::Tensor ms_rms_norm(const at::Tensor& x, double eps) {
  check_input(x, eps, "memfit::ops::ms_rms_norm");
  return MsNormFn<k::NormKind::kRMSNorm>::apply(x, eps);
}

}  // namespace memfit::ops
