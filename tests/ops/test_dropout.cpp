// Dropout with a 1-bit mask.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "kernels/dropout_bits.h"
#include "ops.h"
#include "test_util.h"

namespace {

TEST(Dropout, KeepsOneBitPerElement) {
  for (int64_t n : {1, 7, 8, 9, 1000, 1 << 20}) {
    const at::Tensor leaf = at::randn({n}).requires_grad_(true);
    EXPECT_EQ(memfit::test::kept_bytes(leaf, [](const at::Tensor& x) { return memfit::ops::dropout(x, 0.1, true); }),
              (n + 7) / 8) << "n=" << n;
  }
}

TEST(Dropout, DropsTheRightFractionAndScalesTheRest) {
  at::manual_seed(19);
  const int64_t n = 1 << 21;
  const at::Tensor x = at::rand({n}) + 0.5;  // no zeros
  for (double p : {0.1, 0.5, 0.9}) {
    const at::Tensor y = memfit::ops::dropout(x, p, true);
    const at::Tensor kept = y.ne(0);
    const double frac = 1.0 - kept.to(at::kDouble).mean().item<double>();
    // Binomial sd is sqrt(p(1-p)/n) < 4e-4; allow 10 sd.
    EXPECT_NEAR(frac, p, 4e-3) << "p=" << p;
    const float scale = static_cast<float>(1.0 / (1.0 - p));  // 10 at p = 0.9, not 9.999998
    EXPECT_TRUE(at::equal(y.masked_select(kept), x.masked_select(kept) * scale)) << "p=" << p;
  }
}

TEST(Dropout, BackwardUsesTheSameMask) {
  at::manual_seed(20);
  const at::Tensor x = (at::rand({3, 1001}) + 0.5).requires_grad_(true);
  const at::Tensor y = memfit::ops::dropout(x, 0.3, true);
  const at::Tensor dy = at::randn({3, 1001});
  y.backward(dy);
  const at::Tensor mask = y.ne(0);
  const float scale = static_cast<float>(1.0 / (1.0 - 0.3));
  EXPECT_TRUE(at::equal(x.grad(), at::where(mask, dy * scale, at::zeros_like(dy))));
}

// Forward and backward scale kept elements by one and the same fp32 number, the float
// nearest 1 / (1 - p) (at p = 0.999 forward used to scale by 1000.0129 and backward by
// 1000).
TEST(Dropout, BackwardScalesByTheForwardScale) {
  for (double p : {0.999, 0.5, 0.1}) {
    at::manual_seed(23);
    const at::Tensor x = at::ones({1 << 16}).requires_grad_(true);
    const at::Tensor y = memfit::ops::dropout(x, p, true);
    y.backward(at::ones_like(y));
    const at::Tensor kept = y.ne(0);
    ASSERT_GT(kept.sum().item<int64_t>(), 0) << "p=" << p;
    const float scale = static_cast<float>(1.0 / (1.0 - p));
    const at::Tensor fwd = y.masked_select(kept), bwd = x.grad().masked_select(kept);
    EXPECT_TRUE(at::equal(fwd, bwd)) << "p=" << p << ": forward " << fwd[0].item<float>()
                                     << ", backward " << bwd[0].item<float>();
    EXPECT_TRUE(at::equal(fwd, at::full_like(fwd, scale))) << "p=" << p << ": " << fwd[0].item<float>();
    EXPECT_TRUE(at::equal(x.grad().masked_select(kept.logical_not()), at::zeros({x.numel() - fwd.numel()})));
  }
}

TEST(Dropout, SeededByTheDefaultGenerator) {
  const at::Tensor x = at::ones({4096});
  at::manual_seed(7);
  const at::Tensor a = memfit::ops::dropout(x, 0.5, true);
  at::manual_seed(7);
  const at::Tensor b = memfit::ops::dropout(x, 0.5, true);
  const at::Tensor c = memfit::ops::dropout(x, 0.5, true);
  EXPECT_TRUE(at::equal(a, b));
  EXPECT_FALSE(at::equal(a, c));
}

TEST(Dropout, EvalAndZeroProbabilityAreIdentityAndKeepNothing) {
  const at::Tensor leaf = at::randn({100}).requires_grad_(true);
  EXPECT_EQ(memfit::test::kept_bytes(leaf, [](const at::Tensor& x) { return memfit::ops::dropout(x, 0.5, false); }),
            0);  // the output is the input itself: nothing beyond it
  const at::Tensor x = at::randn({100});
  EXPECT_TRUE(memfit::ops::dropout(x, 0.0, true).is_same(x));
  EXPECT_TRUE(memfit::ops::dropout(x, 0.5, false).is_same(x));
}

TEST(Dropout, HashIsStableAcrossTheIndexHighWord) {
  // The mask for element i depends on (seed, i) only, including past 2^32 elements.
  const uint64_t seed = 0x1234567890ABCDEFull;
  EXPECT_NE(memfit::kernels::dropout_mix32(seed, uint64_t{5}),
            memfit::kernels::dropout_mix32(seed, (uint64_t{1} << 32) + 5));
  EXPECT_EQ(memfit::kernels::dropout_mix32(seed, (uint64_t{1} << 32) + 5),
            memfit::kernels::dropout_mix32(seed, 5u, 1u));
  EXPECT_EQ(memfit::kernels::dropout_threshold(0.0f), 0u);
  EXPECT_EQ(memfit::kernels::dropout_threshold(0.5f), 0x80000000u);
}

TEST(Dropout, NonContiguousEmptyAndBf16) {
  const at::Tensor base = at::rand({40, 30}) + 0.5;
  const at::Tensor t = base.t();
  at::manual_seed(3);
  const at::Tensor a = memfit::ops::dropout(t, 0.4, true);
  at::manual_seed(3);
  const at::Tensor b = memfit::ops::dropout(t.contiguous(), 0.4, true);
  EXPECT_TRUE(at::equal(a, b));  // same mask over the same logical elements
  const at::Tensor e = at::randn({0, 5}).requires_grad_(true);
  const at::Tensor ye = memfit::ops::dropout(e, 0.5, true);
  ye.sum().backward();
  EXPECT_EQ(e.grad().sizes(), e.sizes());
  const at::Tensor xb = (at::rand({1000}) + 0.5).to(at::kBFloat16);
  const at::Tensor yb = memfit::ops::dropout(xb, 0.5, true);
  EXPECT_EQ(yb.scalar_type(), at::kBFloat16);
  const at::Tensor kept = yb.ne(0);
  EXPECT_TRUE(at::equal(yb.masked_select(kept), (xb.to(at::kFloat) * 2.0f).to(at::kBFloat16).masked_select(kept)));
}

TEST(Dropout, BadInput) {
  memfit::test::expect_error([] { memfit::ops::dropout(at::ones({3}), 1.0, true); },
                             {"memfit::ops::dropout", "p must be in [0, 1)"});
  memfit::test::expect_error([] { memfit::ops::dropout(at::ones({3}), -0.1, true); },
                             {"memfit::ops::dropout", "p"});
  memfit::test::expect_error([] { memfit::ops::dropout(at::ones({3}, at::kInt), 0.1, true); },
                             {"memfit::ops::dropout", "Int"});
}

}  // namespace
