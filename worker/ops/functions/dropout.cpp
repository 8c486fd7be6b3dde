// memfit::ops::dropout: dropout that keeps a 1-bit mask.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <torch/csrc/autograd/custom_function.h>

#include <mutex>

#include "dispatch.h"
#include "functions/dropout_seed.h"
#include "kernels/dropout_bits.h"
#include "ops.h"

namespace memfit::ops {
namespace detail {

uint64_t next_dropout_seed() {
  auto gen = at::detail::getDefaultCPUGenerator();
  std::lock_guard<std::mutex> lock(gen.mutex());
  return gen.get<at::CPUGeneratorImpl>()->random64();
}

}  // namespace detail

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct DropoutFn : public torch::autograd::Function<DropoutFn> {
  // Keeps: mask [ceil(numel / 8)] uint8, and the scale forward used (a scalar).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, double p) {
    const at::Tensor xc = x.contiguous();
    at::Tensor y = at::empty(xc.sizes(), xc.options());
    at::Tensor mask = at::empty({kernels::packed1_bytes(xc.numel())}, xc.options().dtype(at::kByte));
    const float scale = kernels::dropout_scale(p);  // once, for both directions
    detail::dropout_forward(xc, y, mask, p, scale, detail::next_dropout_seed());
    ctx->save_for_backward({mask});
    ctx->saved_data["scale"] = static_cast<double>(scale);  // exact: a float widened
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const at::Tensor mask = ctx->get_saved_variables()[0];
    const float scale = static_cast<float>(ctx->saved_data["scale"].toDouble());
    const at::Tensor dy = grads[0].contiguous();
    at::Tensor dx = at::empty(dy.sizes(), dy.options());
    detail::dropout_apply(dy, mask, dx, scale);
    return {dx, at::Tensor()};
  }
};

}  // namespace

at::Tensor dropout(const at::Tensor& x, double p, bool training) {
  TORCH_CHECK(x.defined(), "memfit::ops::dropout: input is undefined");
  detail::check_device(x, "memfit::ops::dropout");
  detail::kernel_dtype(x, "memfit::ops::dropout");
  TORCH_CHECK(p >= 0.0 && p < 1.0, "memfit::ops::dropout: p must be in [0, 1), got ", p);
  if (!training || p == 0.0) return x;
  return DropoutFn::apply(x, p);
}

}  // namespace memfit::ops
