// Merging a norm's gamma/beta into the next linear layer (and back).
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "norm_merge.h"
#include "ops.h"
#include "test_util.h"

namespace {

using memfit::ops::LinearWeights;

TEST(NormMerge, MergedLayerNormBlockGivesSameOutputsAndInputGradients) {
  at::manual_seed(8);
  const int64_t d = 96, out = 64;
  const at::Tensor gamma = at::randn({d}) * 0.5 + 1.0, beta = at::randn({d}) * 0.1;
  const at::Tensor w = at::randn({out, d}) * 0.05, b = at::randn({out}) * 0.01;
  const at::Tensor x0 = at::randn({3, 11, d}), dy = at::randn({3, 11, out});

  // Original: z = LN(x; gamma, beta); y = z W^T + b.
  const at::Tensor xa = x0.clone().requires_grad_(true);
  const at::Tensor ya = at::linear(at::layer_norm(xa, {d}, gamma, beta, 1e-5), w, b);
  ya.backward(dy);

  // MS-BP: y = MS-LN(x) W'^T + b'.
  const memfit::ops::MergedLinear m = memfit::ops::merge_norm_affine(w, b, gamma, beta);
  const at::Tensor xb = x0.clone().requires_grad_(true);
  const at::Tensor yb = memfit::ops::linear(memfit::ops::ms_layer_norm(xb, 1e-5),
                                            LinearWeights::plain(m.weight, m.bias), true);
  yb.backward(dy);
  EXPECT_TRUE(memfit::test::close(yb, ya, 1e-4, 1e-5));
  EXPECT_TRUE(memfit::test::close(xb.grad(), xa.grad(), 1e-4, 1e-5));
}

TEST(NormMerge, MergedRmsNormIntoLoraLayerKeepsLoraOnOriginalInput) {
  // RMSNorm (gamma only) -> LoRA linear. The base weight takes gamma; the LoRA branch
  // sees gamma * y through lora_in_scale, so A and B keep their meaning (PEFT export).
  at::manual_seed(9);
  const int64_t d = 64, out = 48, r = 4;
  const at::Tensor gamma = at::randn({d}) * 0.3 + 1.0;
  const at::Tensor w = at::randn({out, d}) * 0.05;
  const at::Tensor a0 = at::randn({r, d}) * 0.1, b0 = at::randn({out, r}) * 0.1;
  const at::Tensor x0 = at::randn({2, 9, d}), dy = at::randn({2, 9, out});
  const double eps = 1e-6, scale = 2.0;

  const at::Tensor xa = x0.clone().requires_grad_(true);
  const at::Tensor aa = a0.clone().requires_grad_(true), ba = b0.clone().requires_grad_(true);
  const at::Tensor z = xa * at::rsqrt(xa.pow(2).mean(-1, true) + eps) * gamma;
  const at::Tensor ya = at::linear(z, w) + scale * at::linear(at::linear(z, aa), ba);
  ya.backward(dy);

  const memfit::ops::MergedLinear m = memfit::ops::merge_norm_affine(w, {}, gamma, {});
  EXPECT_FALSE(m.bias.defined());
  const at::Tensor xb = x0.clone().requires_grad_(true);
  const at::Tensor ab = a0.clone().requires_grad_(true), bb = b0.clone().requires_grad_(true);
  LinearWeights lw{m.weight, {}, ab, bb, scale, 0.0, gamma, {}};
  const at::Tensor yb = memfit::ops::linear(memfit::ops::ms_rms_norm(xb, eps), lw, true);
  yb.backward(dy);
  EXPECT_TRUE(memfit::test::close(yb, ya, 1e-4, 1e-5));
  EXPECT_TRUE(memfit::test::close(xb.grad(), xa.grad(), 1e-4, 1e-5));
  EXPECT_TRUE(memfit::test::close(ab.grad(), aa.grad(), 1e-4, 1e-5));
  EXPECT_TRUE(memfit::test::close(bb.grad(), ba.grad(), 1e-4, 1e-5));
}

TEST(NormMerge, MergeIsFloat64AndUnmergeRoundTrips) {
  at::manual_seed(10);
  const at::Tensor gamma = at::randn({32}) + 2.0, beta = at::randn({32});
  const at::Tensor w = at::randn({16, 32}), b = at::randn({16});
  const memfit::ops::MergedLinear m = memfit::ops::merge_norm_affine(w, b, gamma, beta);
  // W' = W diag(gamma), b' = b + W beta, each rounded once from float64.
  const at::Tensor wd = w.to(at::kDouble);
  EXPECT_TRUE(at::equal(m.weight, (wd * gamma.to(at::kDouble)).to(at::kFloat)));
  EXPECT_TRUE(at::equal(m.bias, (b.to(at::kDouble) + at::mv(wd, beta.to(at::kDouble))).to(at::kFloat)));
  const memfit::ops::MergedLinear u = memfit::ops::unmerge_norm_affine(m.weight, m.bias, gamma, beta, true);
  EXPECT_TRUE(memfit::test::close(u.weight, w, 1e-6, 1e-6));
  EXPECT_TRUE(memfit::test::close(u.bias, b, 1e-5, 1e-5));
  // A layer without bias stays without one.
  const memfit::ops::MergedLinear m2 = memfit::ops::merge_norm_affine(w, {}, gamma, beta);
  const memfit::ops::MergedLinear u2 = memfit::ops::unmerge_norm_affine(m2.weight, m2.bias, gamma, beta, false);
  EXPECT_FALSE(u2.bias.defined());
  // bf16 weights: computed in float64, rounded once.
  const memfit::ops::MergedLinear mb = memfit::ops::merge_norm_affine(w.to(at::kBFloat16), {}, gamma, {});
  EXPECT_EQ(mb.weight.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(mb.weight, (w.to(at::kBFloat16).to(at::kDouble) * gamma.to(at::kDouble)).to(at::kBFloat16)));
}

TEST(NormMerge, BadInputNamesTheProblem) {
  const at::Tensor w = at::ones({4, 8});
  memfit::test::expect_error([&] { memfit::ops::merge_norm_affine(w, {}, at::ones({7}), {}); },
                             {"merge_norm_affine", "gamma", "[8]"});
  memfit::test::expect_error([&] { memfit::ops::merge_norm_affine(w, at::ones({3}), at::ones({8}), {}); },
                             {"merge_norm_affine", "bias", "[4]"});
  at::Tensor g = at::ones({8});
  g[5] = 0.0;
  memfit::test::expect_error([&] { memfit::ops::unmerge_norm_affine(w, {}, g, {}, false); },
                             {"unmerge_norm_affine", "gamma[5]"});
}

}  // namespace
