// Moving a norm's affine parameters into the following linear layer(s), for MS-BP
// (shared/docs/method.md section 2): for z = gamma * y + beta followed by W z + b,
//   W' = W diag(gamma)   (column j scaled by gamma_j),   b' = b + W beta.
// The arithmetic runs in float64 and the results are cast back to W's dtype.
// unmerge_norm_affine is the inverse, for exporting weights that Hugging Face tools load.
#pragma once

#include <ATen/core/Tensor.h>

namespace memfit::ops {

struct MergedLinear {
  at::Tensor weight;  // [out, in]
  at::Tensor bias;    // [out]; undefined only if the layer had no bias and beta was absent
};

// weight [out, in]; bias [out] or undefined; gamma [in]; beta [in] or undefined.
MergedLinear merge_norm_affine(const at::Tensor& weight, const at::Tensor& bias,
                               const at::Tensor& gamma, const at::Tensor& beta);

// Recovers the original (weight, bias) from merged ones. had_bias says whether the
// original layer had a bias (if not, the recovered bias is dropped). Fails, naming the
// index, if gamma has a zero (the merge lost that column).
MergedLinear unmerge_norm_affine(const at::Tensor& merged_weight, const at::Tensor& merged_bias,
                                 const at::Tensor& gamma, const at::Tensor& beta,
                                 bool had_bias);

}  // namespace memfit::ops
