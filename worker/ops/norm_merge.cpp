#include "norm_merge.h"

#include <ATen/ATen.h>

#include <algorithm>

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

// Rows per float64 block: the float64 transient stays near 32 MiB whatever the layer.
int64_t block_rows(int64_t in) { return std::max<int64_t>(1, (int64_t{4} << 20) / std::max<int64_t>(in, 1)); }

MergedLinear merge_norm_affine(const at::Tensor& weight, const at::Tensor& bias,
                               const at::Tensor& gamma, const at::Tensor& beta) {
  check_args("memfit::ops::merge_norm_affine", weight, bias, gamma, beta);
  const int64_t out = weight.size(0), in = weight.size(1);
  const at::Tensor g64 = gamma.to(weight.device(), at::kDouble).unsqueeze(0);
  const at::Tensor b64 = beta.defined() ? beta.to(weight.device(), at::kDouble) : at::Tensor();
  MergedLinear m;
  m.weight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  at::Tensor bias64;
  if (beta.defined() || bias.defined()) {
    bias64 = bias.defined() ? bias.to(weight.device(), at::kDouble) : at::zeros({out}, g64.options());
  }
  // Row blocks, so that the float64 copies stay small for large layers.
  for (int64_t r0 = 0; r0 < out; r0 += block_rows(in)) {
    const int64_t n = std::min(block_rows(in), out - r0);
    const at::Tensor w64 = weight.narrow(0, r0, n).to(at::kDouble);
    m.weight.narrow(0, r0, n).copy_(w64 * g64);
    if (b64.defined()) bias64.narrow(0, r0, n).add_(at::mv(w64, b64));
  }
  if (bias64.defined()) m.bias = bias64.to(bias.defined() ? bias.scalar_type() : weight.scalar_type());
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
  const int64_t out = merged_weight.size(0), in = merged_weight.size(1);
  const at::Tensor inv = g64.reciprocal().unsqueeze(0);
  const at::Tensor b64 = beta.defined() ? beta.to(merged_weight.device(), at::kDouble) : at::Tensor();
  MergedLinear m;
  m.weight = at::empty_like(merged_weight, at::MemoryFormat::Contiguous);
  at::Tensor bias64 = had_bias ? merged_bias.to(at::kDouble) : at::Tensor();
  TORCH_CHECK(!had_bias || merged_bias.defined(), op, ": had_bias is true but merged_bias is undefined");
  for (int64_t r0 = 0; r0 < out; r0 += block_rows(in)) {
    const int64_t n = std::min(block_rows(in), out - r0);
    const at::Tensor w64 = merged_weight.narrow(0, r0, n).to(at::kDouble) * inv;
    m.weight.narrow(0, r0, n).copy_(w64);
    if (had_bias && b64.defined()) bias64.narrow(0, r0, n).sub_(at::mv(w64, b64));
  }
  if (had_bias) m.bias = bias64.to(merged_bias.scalar_type());
  return m;
}

}  // namespace memfit::ops
