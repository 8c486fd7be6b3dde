// ReGELU2 / ReSiLU2: exact forward, flags at the thresholds, backward dy * s[flag],
// flag packing, dtypes, shapes, kept bytes, bad input.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kernels/approx_act.h"
#include "ops.h"
#include "test_util.h"

namespace {

using memfit::kernels::ApproxAct;
namespace k = memfit::kernels;

at::Tensor run(ApproxAct act, const at::Tensor& x) {
  return act == ApproxAct::kReGELU2 ? memfit::ops::regelu2(x) : memfit::ops::resilu2(x);
}

at::Tensor exact_ref(ApproxAct act, const at::Tensor& x) {
  // GELU as 0.5 x erfc(-x / sqrt 2): 0.5 x (1 + erf(x / sqrt 2)) cancels to 0 in the far
  // negative tail even in float64.
  const at::Tensor xd = x.to(at::kDouble);
  return act == ApproxAct::kReGELU2 ? 0.5 * xd * at::erfc(-xd / std::sqrt(2.0)) : at::silu(xd);
}

// Expected flag per element, straight from the definition f = sum_k [x > c_k] in fp32.
int expected_flag(ApproxAct act, float x) {
  const k::StepLevels lv = k::step_levels(act);
  return (x > lv.c[0]) + (x > lv.c[1]) + (x > lv.c[2]);
}

class ApproxActTest : public ::testing::TestWithParam<ApproxAct> {};

TEST_P(ApproxActTest, ForwardIsExactActivation) {
  const ApproxAct act = GetParam();
  at::manual_seed(1);
  const at::Tensor x = at::randn({4096 * 8 + 3}) * 4.0;
  const at::Tensor y = run(act, x);
  // Against a float64 reference: fp32 rounding plus the erfc/exp approximations.
  EXPECT_TRUE(memfit::test::close(y, exact_ref(act, x), 2e-6, 1e-7));
  // And against LibTorch's own fp32 op.
  const at::Tensor stock = act == ApproxAct::kReGELU2 ? at::gelu(x) : at::silu(x);
  EXPECT_TRUE(memfit::test::close(y, stock, 1e-5, 1e-6));
}

TEST_P(ApproxActTest, ForwardTailIsRelativelyAccurate) {
  // Far negative inputs, where 1 + erf(x) cancels in a naive fp32 GELU.
  const ApproxAct act = GetParam();
  const at::Tensor x = at::linspace(-12.0, -2.0, 1001);
  EXPECT_TRUE(memfit::test::close(run(act, x), exact_ref(act, x), 2e-5, 1e-30));
}

TEST_P(ApproxActTest, FlagsAtThresholdsAndSpecialValues) {
  const ApproxAct act = GetParam();
  const k::StepLevels lv = k::step_levels(act);
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<float> v = {inf, -inf, 0.0f, -0.0f, 1e30f, -1e30f};
  for (float c : lv.c) {
    v.push_back(c);
    v.push_back(std::nextafter(c, inf));
    v.push_back(std::nextafter(c, -inf));
  }
  const at::Tensor x = at::tensor(v).requires_grad_(true);
  const at::Tensor y = run(act, x);
  y.backward(at::ones_like(y));
  const at::Tensor g = x.grad();
  for (size_t i = 0; i < v.size(); ++i) {
    const int f = expected_flag(act, v[i]);
    EXPECT_EQ(g[i].item<float>(), lv.s[f]) << "x = " << v[i] << " expected flag " << f;
  }
  // Definitions at the edges: x == c_k is not above c_k.
  for (int kk = 0; kk < 3; ++kk) EXPECT_EQ(expected_flag(act, lv.c[kk]), kk);
  // +inf -> flag 3, slope 1; -inf -> flag 0, slope 0; outputs inf and 0.
  EXPECT_EQ(g[0].item<float>(), lv.s[3]);
  EXPECT_FLOAT_EQ(lv.s[3], 1.0f);
  EXPECT_EQ(g[1].item<float>(), 0.0f);
  EXPECT_EQ(y[0].item<float>(), inf);
  EXPECT_EQ(y[1].item<float>(), 0.0f);
}

TEST_P(ApproxActTest, NaNInputGivesNaNOutputAndZeroFlag) {
  const ApproxAct act = GetParam();
  const at::Tensor x = at::tensor({std::numeric_limits<float>::quiet_NaN(), 1.0f}).requires_grad_(true);
  const at::Tensor y = run(act, x);
  EXPECT_TRUE(std::isnan(y[0].item<float>()));
  y.backward(at::full_like(y, 3.0));
  EXPECT_EQ(x.grad()[0].item<float>(), 0.0f);  // flag 0: s[0] = 0
  EXPECT_EQ(x.grad()[1].item<float>(), 3.0f * k::step_levels(act).s[2]);
}

TEST_P(ApproxActTest, BackwardIsDyTimesStepLevel) {
  const ApproxAct act = GetParam();
  at::manual_seed(2);
  const at::Tensor x = (at::randn({37, 129}) * 5.0).requires_grad_(true);
  const at::Tensor dy = at::randn({37, 129});
  run(act, x).backward(dy);
  const k::StepLevels lv = k::step_levels(act);
  const float* xp = x.data_ptr<float>();
  const float* dyp = dy.data_ptr<float>();
  const at::Tensor gx = x.grad().contiguous();
  const float* gp = gx.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) {
    ASSERT_EQ(gp[i], dyp[i] * lv.s[expected_flag(act, xp[i])]) << "element " << i;
  }
}

TEST_P(ApproxActTest, FlagPackingLayoutAtOddSizes) {
  const ApproxAct act = GetParam();
  for (int64_t n : {1, 2, 3, 4, 5, 7, 8, 9, 255, 257, 1023, 1025, 70001}) {
    at::manual_seed(n);
    const at::Tensor x = at::randn({n}) * 5.0;
    at::Tensor y = at::empty_like(x);
    // Poison the bytes so that unwritten padding would show.
    at::Tensor flags = at::full({k::packed2_bytes(n)}, 0xFF, at::kByte);
    k::approx_act_forward_cpu(act, k::DType::kFloat32, x.data_ptr(), y.data_ptr(),
                              flags.data_ptr<uint8_t>(), n);
    ASSERT_EQ(flags.numel(), (n + 3) / 4);
    const uint8_t* fp = flags.data_ptr<uint8_t>();
    const float* xp = x.data_ptr<float>();
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ((fp[i >> 2] >> (2 * (i & 3))) & 3, expected_flag(act, xp[i])) << "n=" << n << " i=" << i;
    }
    // Padding bits of the last byte are zero.
    const int used = static_cast<int>(n % 4);
    if (used != 0) {
      EXPECT_EQ(fp[(n - 1) >> 2] >> (2 * used), 0) << "n=" << n;
    }
    // Round trip: unpacking through the backward kernel gives s[flag] per element.
    at::Tensor ones = at::ones({n});
    at::Tensor dx = at::empty({n});
    k::approx_act_backward_cpu(act, k::DType::kFloat32, ones.data_ptr(), fp, dx.data_ptr(), n);
    const k::StepLevels lv = k::step_levels(act);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(dx[i].item<float>(), lv.s[expected_flag(act, xp[i])]);
  }
}

TEST_P(ApproxActTest, KeepsExactlyQuarterByteFlags) {
  const ApproxAct act = GetParam();
  for (int64_t n : {1, 6, 1000, 4097, 1 << 20}) {
    const at::Tensor leaf = at::randn({n}).requires_grad_(true);
    const int64_t kept = memfit::test::kept_bytes(leaf, [&](const at::Tensor& x) { return run(act, x); });
    EXPECT_EQ(kept, (n + 3) / 4) << "n=" << n;
  }
  // The stock op keeps its whole fp32 input.
  const at::Tensor leaf = at::randn({4096}).requires_grad_(true);
  EXPECT_EQ(memfit::test::kept_bytes(leaf, [](const at::Tensor& x) { return at::gelu(x); }), 4096 * 4);
}

TEST_P(ApproxActTest, ReducedPrecisionMatchesFloatPath) {
  const ApproxAct act = GetParam();
  at::manual_seed(3);
  const at::Tensor x32 = at::randn({3000}) * 4.0;
  for (at::ScalarType st : {at::kBFloat16, at::kHalf}) {
    const at::Tensor x = x32.to(st).requires_grad_(true);
    const at::Tensor y = run(act, x);
    ASSERT_EQ(y.scalar_type(), st);
    // Output = the fp32 result of the rounded input, rounded once.
    const at::Tensor ref = run(act, x.detach().to(at::kFloat)).to(st);
    EXPECT_TRUE(at::equal(y, ref)) << st;
    const at::Tensor dy = at::randn({3000}).to(st);
    y.backward(dy);
    const at::Tensor xr = x.detach().to(at::kFloat).requires_grad_(true);
    run(act, xr).backward(dy.to(at::kFloat));
    EXPECT_TRUE(at::equal(x.grad(), xr.grad().to(st))) << st;
  }
}

TEST_P(ApproxActTest, NonContiguousAndEmptyInputs) {
  const ApproxAct act = GetParam();
  at::manual_seed(4);
  const at::Tensor base = at::randn({64, 48});
  const at::Tensor xt = base.t().requires_grad_(false);  // non-contiguous view
  ASSERT_FALSE(xt.is_contiguous());
  EXPECT_TRUE(at::equal(run(act, xt), run(act, xt.contiguous())));
  const at::Tensor strided = base.slice(1, 0, 48, 3);
  EXPECT_TRUE(at::equal(run(act, strided), run(act, strided.contiguous())));

  const at::Tensor empty = at::randn({0, 7}).requires_grad_(true);
  const at::Tensor y = run(act, empty);
  EXPECT_EQ(y.sizes(), empty.sizes());
  y.sum().backward();
  EXPECT_EQ(empty.grad().sizes(), empty.sizes());
  const at::Tensor scalar = at::scalar_tensor(0.5).requires_grad_(true);
  EXPECT_EQ(run(act, scalar).dim(), 0);
}

TEST_P(ApproxActTest, BadInputNamesOpAndProblem) {
  const ApproxAct act = GetParam();
  const char* name = act == ApproxAct::kReGELU2 ? "memfit::ops::regelu2" : "memfit::ops::resilu2";
  memfit::test::expect_error([&] { run(act, at::ones({4}, at::kLong)); }, {name, "Long"});
  memfit::test::expect_error([&] { run(act, at::ones({4}, at::kDouble)); }, {name, "Double"});
  memfit::test::expect_error([&] { run(act, at::Tensor()); }, {name, "undefined"});
  memfit::test::expect_error([&] { run(act, at::empty({4}, at::Device(at::kMeta))); },
                             {name, "meta", "not supported"});
}

INSTANTIATE_TEST_SUITE_P(Acts, ApproxActTest,
                         ::testing::Values(ApproxAct::kReGELU2, ApproxAct::kReSiLU2),
                         [](const auto& info) {
                           return info.param == ApproxAct::kReGELU2 ? "ReGELU2" : "ReSiLU2";
                         });

TEST(ApproxActTanh, ForwardIsTanhGeluAndBackwardIsReGELU2Steps) {
  at::manual_seed(30);
  const at::Tensor x = (at::randn({10007}) * 4.0).requires_grad_(true);
  const at::Tensor y = memfit::ops::regelu2_tanh(x);
  const at::Tensor ref = at::gelu(x.detach().to(at::kDouble), "tanh");
  EXPECT_TRUE(memfit::test::close(y, ref, 2e-6, 1e-7));
  const at::Tensor dy = at::randn({10007});
  y.backward(dy);
  const k::StepLevels lv = k::step_levels(ApproxAct::kReGELU2);
  const at::Tensor expect = dy * at::where(x.detach() > lv.c[2], lv.s[3],
                                           at::where(x.detach() > lv.c[1], lv.s[2],
                                                     at::where(x.detach() > lv.c[0], at::scalar_tensor(lv.s[1]),
                                                               at::scalar_tensor(lv.s[0]))));
  EXPECT_TRUE(at::equal(x.grad(), expect));
  const at::Tensor leaf = at::randn({4096}).requires_grad_(true);
  EXPECT_EQ(memfit::test::kept_bytes(leaf, [](const at::Tensor& t) { return memfit::ops::regelu2_tanh(t); }), 1024);
}

TEST(ApproxActConstants, StepLevelsFollowTheFittedCoefficients) {
  for (ApproxAct act : {ApproxAct::kReGELU2, ApproxAct::kReSiLU2}) {
    const k::StepConstants& c = k::step_constants(act);
    // Constraints of the fit: sum a = 1, sum a c = 0.
    EXPECT_NEAR(c.a[0] + c.a[1] + c.a[2], 1.0, 1e-12);
    EXPECT_NEAR(c.a[0] * c.c[0] + c.a[1] * c.c[1] + c.a[2] * c.c[2], 0.0, 1e-9);
    const k::StepLevels lv = k::step_levels(act);
    EXPECT_EQ(lv.s[0], 0.0f);
    EXPECT_EQ(lv.s[1], static_cast<float>(c.a[0]));
    EXPECT_EQ(lv.s[2], static_cast<float>(c.a[0] + c.a[1]));
  }
  EXPECT_EQ(k::packed2_bytes(0), 0);
  EXPECT_EQ(k::packed2_bytes(5), 2);
}

}  // namespace
