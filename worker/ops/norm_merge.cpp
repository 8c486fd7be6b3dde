#include "norm_merge.h"

#include <ATen/ATen.h>

namespace memfit::ops {
namespace {

void check_args(const char* op, const at::Tensor& weight, const at::Tensor& bias,
                const at::Tensor& gamma, const at::Tensor& beta) {
  TORCH_CHECK(weight.defined() && weight.dim() == 2, op, ": weight must be 2-D [out, in]");
  TORCH_CHECK(weight.is_floating_point(), op, ": weight must be floating point, got ",
              weight.scalar_type());
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(gamma.defined() && gamma.dim() == 1 && gamma.size(0) == in, op,
              ": gamma must be [", in, "] to match weight ", weight.sizes());
  if (beta.defined()) {
    TORCH_CHECK(beta.dim() == 1 && beta.size(0) == in, op, ": beta must be [", in, "], got ",
                beta.sizes());
  }
  if (bias.defined()) {
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == out, op, ": bias must be [", out, "], got ",
                bias.sizes());
  }
}

}  // namespace

MergedLinear merge_norm_affine(const at::Tensor& weight, const at::Tensor& bias,
                               const at::Tensor& gamma, const at::Tensor& beta) {
  check_args("memfit::ops::merge_norm_affine", weight, bias, gamma, beta);
  const at::Tensor w64 = weight.to(at::kDouble);
  MergedLinear m;
  m.weight = (w64 * gamma.to(weight.device(), at::kDouble).unsqueeze(0)).to(weight.scalar_type());
  if (beta.defined() || bias.defined()) {
    at::Tensor b64 = bias.defined() ? bias.to(weight.device(), at::kDouble)
                                    : at::zeros({weight.size(0)}, w64.options());
    if (beta.defined()) b64 = b64 + at::mv(w64, beta.to(weight.device(), at::kDouble));
    m.bias = b64.to(bias.defined() ? bias.scalar_type() : weight.scalar_type());
  }
  return m;
}

MergedLinear unmerge_norm_affine(const at::Tensor& merged_weight, const at::Tensor& merged_bias,
                                 const at::Tensor& gamma, const at::Tensor& beta,
                                 bool had_bias) {
  const char* op = "memfit::ops::unmerge_norm_affine";
  check_args(op, merged_weight, merged_bias, gamma, beta);
  const at::Tensor g64 = gamma.to(merged_weight.device(), at::kDouble);
  const at::Tensor zero = g64.eq(0).nonzero();
  TORCH_CHECK(zero.numel() == 0, op, ": gamma[", zero.numel() ? zero[0].item<int64_t>() : 0,
              "] is 0, so the merged weight lost that input column and cannot be unmerged");
  const at::Tensor w64 = merged_weight.to(at::kDouble) / g64.unsqueeze(0);
  MergedLinear m;
  m.weight = w64.to(merged_weight.scalar_type());
  if (had_bias) {
    TORCH_CHECK(merged_bias.defined(), op, ": had_bias is true but merged_bias is undefined");
    at::Tensor b64 = merged_bias.to(at::kDouble);
    if (beta.defined()) b64 = b64 - at::mv(w64, beta.to(merged_weight.device(), at::kDouble));
    m.bias = b64.to(merged_bias.scalar_type());
  }
  return m;
}

}  // namespace memfit::ops
