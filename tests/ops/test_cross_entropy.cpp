// linear_cross_entropy: the loss and gradients of cross_entropy(h W^T, labels), without
// the logits ever being kept.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "ops.h"
#include "test_util.h"

namespace {

TEST(LinearCrossEntropy, LossAndGradientsMatchTheComposite) {
  at::manual_seed(40);
  const int64_t T = 37, d = 24, V = 301;
  const at::Tensor h0 = at::randn({T, d}), w0 = at::randn({V, d}) * 0.3;
  at::Tensor y = at::randint(V, {T}, at::kLong);
  y.narrow(0, 5, 4).fill_(-100);  // ignored rows
  for (bool train_w : {false, true}) {
    for (int64_t chunk : {int64_t(32 << 20), int64_t(V * 4 * 3)}) {  // one chunk, or 3 rows at a time
      const at::Tensor ha = h0.clone().requires_grad_(true), hb = h0.clone().requires_grad_(true);
      const at::Tensor wa = w0.clone().requires_grad_(train_w), wb = w0.clone().requires_grad_(train_w);
      const at::Tensor la = memfit::ops::linear_cross_entropy(ha, wa, y, chunk);
      const at::Tensor lb = at::cross_entropy_loss(at::linear(hb, wb), y, {}, at::Reduction::Mean, -100);
      EXPECT_NEAR(la.item<double>(), lb.item<double>(), 1e-5);
      (la * 2.5).backward();  // the incoming gradient scales what forward formed
      (lb * 2.5).backward();
      EXPECT_TRUE(memfit::test::close(ha.grad(), hb.grad(), 1e-4, 1e-6));
      if (train_w) {
        EXPECT_TRUE(memfit::test::close(wa.grad(), wb.grad(), 1e-4, 1e-6));
      }
    }
  }
}

// bf16: the CUDA path's products in bf16 (fp32 logits), run here on the CPU, against the
// unfused head in bf16 and the loss in fp32, which is what the exact modes compute.
TEST(LinearCrossEntropy, LowPrecisionProductsMatchTheUnfusedBf16Head) {
  at::manual_seed(41);
  const int64_t T = 29, d = 32, V = 211;
  const at::Tensor h0 = at::randn({T, d}).to(at::kBFloat16), w0 = (at::randn({V, d}) * 0.3).to(at::kBFloat16);
  at::Tensor y = at::randint(V, {T}, at::kLong);
  y.narrow(0, 3, 2).fill_(-100);
  memfit::ops::detail::low_precision_loss_products_everywhere(true);
  for (bool train_w : {false, true}) {
    const at::Tensor ha = h0.clone().requires_grad_(true), hb = h0.clone().requires_grad_(true);
    const at::Tensor wa = w0.clone().requires_grad_(train_w), wb = w0.clone().requires_grad_(train_w);
    const at::Tensor la = memfit::ops::linear_cross_entropy(ha, wa, y, V * 4 * 4);  // 4 rows a chunk
    const at::Tensor lb =
        at::cross_entropy_loss(at::linear(hb, wb).to(at::kFloat), y, {}, at::Reduction::Mean, -100);
    EXPECT_NEAR(la.item<double>(), lb.item<double>(), 1e-4);
    la.backward();
    lb.backward();
    EXPECT_TRUE(memfit::test::close(ha.grad().to(at::kFloat), hb.grad().to(at::kFloat), 2e-2, 1e-3));
    if (train_w) EXPECT_TRUE(memfit::test::close(wa.grad().to(at::kFloat), wb.grad().to(at::kFloat), 2e-2, 1e-3));
  }
  memfit::ops::detail::low_precision_loss_products_everywhere(false);
}

// Every label ignored: the loss is 0 and its gradient exactly 0 (dh was left unwritten,
// so backward returned whatever the allocator's memory held).
TEST(LinearCrossEntropy, NoCountedRowGivesZeroGradients) {
  const at::Tensor w = at::randn({50, 8});
  const at::Tensor y = at::full({6}, -100, at::kLong);
  for (int round = 0; round < 3; ++round) {
    const at::Tensor h = at::randn({6, 8}).requires_grad_(true);
    { at::Tensor dirt = at::full({6, 8}, 7.0f); }  // non-zero bytes of dh's size, freed last
    const at::Tensor l = memfit::ops::linear_cross_entropy(h, w, y);
    EXPECT_EQ(l.item<double>(), 0.0);
    l.backward();
    EXPECT_EQ(h.grad().abs().max().item<float>(), 0.0f);
  }
}

TEST(LinearCrossEntropy, KeepsTheInputGradientNotTheLogits) {
  const int64_t T = 64, d = 32, V = 5000;
  const at::Tensor leaf = at::randn({T, d}).requires_grad_(true);
  const at::Tensor w = at::randn({V, d});
  const at::Tensor y = at::randint(V, {T}, at::kLong);
  const int64_t ours = memfit::test::kept_bytes(leaf, [&](const at::Tensor& h) {
    return memfit::ops::linear_cross_entropy(h, w, y);
  });
  EXPECT_EQ(ours, T * d * 4);  // dL/dh only
  const int64_t stock = memfit::test::kept_bytes(leaf, [&](const at::Tensor& h) {
    return at::cross_entropy_loss(at::linear(h, w), y, {}, at::Reduction::Mean, -100);
  });
  EXPECT_GE(stock, T * V * 4);  // the log-softmax of every logit
  // Without autograd (evaluation) nothing is formed or kept.
  at::NoGradGuard ng;
  const int64_t before = memfit::test::current_bytes();
  const at::Tensor l = memfit::ops::linear_cross_entropy(leaf, w, y);
  EXPECT_EQ(memfit::test::current_bytes() - before, static_cast<int64_t>(l.nbytes()));
}

TEST(LinearCrossEntropy, BadInputNamesTheProblem) {
  const at::Tensor h = at::randn({4, 8}), w = at::randn({10, 8});
  memfit::test::expect_error([&] { memfit::ops::linear_cross_entropy(h, w, at::tensor({1, 2, 3, 10}, at::kLong)); },
                             {"linear_cross_entropy", "[0, 10)"});
  memfit::test::expect_error([&] { memfit::ops::linear_cross_entropy(h, at::randn({10, 7}), at::zeros({4}, at::kLong)); },
                             {"linear_cross_entropy", "weight"});
  memfit::test::expect_error([&] { memfit::ops::linear_cross_entropy(h, w, at::zeros({4})); },
                             {"linear_cross_entropy", "int64"});
}

}  // namespace
