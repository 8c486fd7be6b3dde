// The optimizer's gradient norm and clipping (worker/train/optimizer.cpp) against float64
// references.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "norm_merge.h"
#include "train/optimizer.h"

namespace memfit::train {
namespace {

double reference_sq(const at::Tensor& g) { return g.to(at::kDouble).pow(2).sum().item<double>(); }

// A gradient shaped like GPT-2's embedding gradient (50257 x 96 = 4.8M elements): most
// rows small, a few large, as a sparse-token embedding gradient is.
at::Tensor embedding_like_gradient(at::ScalarType dtype) {
  at::manual_seed(11);
  at::Tensor g = at::randn({50257, 96}) * 1e-4;
  g.index({at::indexing::Slice(0, 300)}).mul_(1e3);
  return g.to(dtype);
}

TEST(GradNorm, SumOfSquaresIsTheFloat64SumForLargeGradients) {
  for (const auto dtype : {at::kFloat, at::kBFloat16}) {
    const at::Tensor g = embedding_like_gradient(dtype);
    const double ref = reference_sq(g);
    EXPECT_NEAR(sum_of_squares(g) / ref, 1.0, 1e-12) << c10::toString(dtype);
  }
}

TEST(GradNorm, SumOfSquaresDoesNotDependOnTheThreadCount) {
  const at::Tensor g = embedding_like_gradient(at::kFloat);
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const double one = sum_of_squares(g);
  at::set_num_threads(std::max(2, threads));
  const double many = sum_of_squares(g);
  at::set_num_threads(threads);
  EXPECT_EQ(one, many);
}

TEST(GradNorm, SmallStridedAndEmptyGradients) {
  const at::Tensor t = at::arange(12, at::kFloat).reshape({3, 4});
  EXPECT_DOUBLE_EQ(sum_of_squares(t), 506.0);            // 0^2 + ... + 11^2
  EXPECT_NEAR(sum_of_squares(t.t()), 506.0, 1e-3);         // strided: the device reduction
  EXPECT_EQ(sum_of_squares(at::zeros({0}, at::kFloat)), 0.0);
}

at::Tensor with_grad(at::Tensor p, at::Tensor g) {
  p.requires_grad_(true);
  p.mutable_grad() = std::move(g);
  return p;
}

TEST(GradNorm, ClipReportsTheFloat64NormAndClipsToMaxNorm) {
  at::Tensor big = with_grad(at::zeros({50257, 96}), embedding_like_gradient(at::kFloat));
  at::manual_seed(3);
  at::Tensor small = with_grad(at::zeros({96}), at::randn({96}));
  const double ref = std::sqrt(reference_sq(big.grad()) + reference_sq(small.grad()));
  AdamW opt({{"wte", big}, {"ln", small}}, 0.0);
  const double norm = opt.clip_grad_norm(0.5);
  EXPECT_NEAR(norm / ref, 1.0, 1e-12);
  const double after = std::sqrt(reference_sq(big.grad()) + reference_sq(small.grad()));
  EXPECT_NEAR(after, 0.5 * norm / (norm + 1e-6), 1e-6);
  // Under the limit nothing changes.
  const at::Tensor before = big.grad().clone();
  opt.clip_grad_norm(1e9);
  EXPECT_TRUE(at::equal(before, big.grad()));
}

}  // namespace
}  // namespace memfit::train

namespace memfit::train {
namespace {

// Memory-sharing norms fold a norm's scale and shift into the next linear (W' = W
// diag(gamma), b' = b + W beta). One AdamW step with weight decay and a zero gradient
// (Adam's own update is then 0) shows what the decay touches: unfolded at export, W
// shrinks by (1 - lr wd) exactly as stock training decays it, the scale and shift stay,
// and the bias absorbs the part of W beta that stock training would have decayed.
TEST(WeightDecay, FoldedNormScaleIsNotDecayedAndTheShiftsShareStaysInTheBias) {
  at::manual_seed(5);
  const at::Tensor W = at::randn({6, 4}), b = at::randn({6});
  const at::Tensor gamma = at::rand({4}) + 0.5, beta = at::randn({4});
  const ops::MergedLinear folded = ops::merge_norm_affine(W, b, gamma, beta);
  at::Tensor w = with_grad(folded.weight.clone(), at::zeros_like(folded.weight));
  at::Tensor bb = with_grad(folded.bias.clone(), at::zeros_like(folded.bias));
  const double lr = 0.1, wd = 0.5;
  AdamW opt({{"fc.weight", w}, {"fc.bias", bb}}, wd);
  opt.step(lr);
  const ops::MergedLinear out = ops::unmerge_norm_affine(w.detach(), bb.detach(), gamma, beta, true);
  EXPECT_TRUE(at::allclose(out.weight, W * (1 - lr * wd), 1e-5, 1e-6));
  // Not what stock training would give (b unchanged): the difference is lr wd W beta.
  EXPECT_GT((out.bias - b).abs().max().item<double>(), 1e-3);
  EXPECT_TRUE(at::allclose(out.bias, b + lr * wd * at::mv(W, beta), 1e-5, 1e-6));
}

}  // namespace
}  // namespace memfit::train
