// MS-LayerNorm / MS-RMSNorm: outputs and gradients equal LibTorch's own; kept bytes.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "ops.h"
#include "test_util.h"

namespace {

enum class Kind { kLayer, kRms };

at::Tensor ms(Kind kind, const at::Tensor& x, double eps) {
  return kind == Kind::kLayer ? memfit::ops::ms_layer_norm(x, eps) : memfit::ops::ms_rms_norm(x, eps);
}

// LibTorch's own: at::layer_norm without affine, and the usual RMSNorm composite.
at::Tensor stock(Kind kind, const at::Tensor& x, double eps) {
  if (kind == Kind::kLayer) return at::layer_norm(x, {x.size(-1)}, {}, {}, eps);
  return x * at::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + eps);
}

class MsNormTest : public ::testing::TestWithParam<Kind> {};

TEST_P(MsNormTest, OutputAndGradientsMatchLibTorch) {
  const Kind kind = GetParam();
  for (auto shape : std::vector<std::vector<int64_t>>{{2, 3, 768}, {5, 1}, {17, 4096}, {3, 33}}) {
    at::manual_seed(5);
    const at::Tensor x0 = at::randn(shape) * 3.0 + 0.7;
    const at::Tensor dy = at::randn(shape);
    const at::Tensor a = x0.clone().requires_grad_(true), b = x0.clone().requires_grad_(true);
    const at::Tensor ya = ms(kind, a, 1e-5), yb = stock(kind, b, 1e-5);
    // atol covers rows of length 1, where LibTorch's Welford variance leaves ~1e-5 of
    // rounding noise and memfit's two-pass variance gives exactly 0.
    EXPECT_TRUE(memfit::test::close(ya, yb, 1e-5, 5e-5)) << at::IntArrayRef(shape);
    ya.backward(dy);
    yb.backward(dy);
    EXPECT_TRUE(memfit::test::close(a.grad(), b.grad(), 1e-4, 1e-5)) << at::IntArrayRef(shape);
  }
}

TEST_P(MsNormTest, GradientMatchesFloat64Reference) {
  const Kind kind = GetParam();
  at::manual_seed(6);
  const at::Tensor x0 = at::randn({8, 256}) * 2.0 - 1.0;
  const at::Tensor dy = at::randn({8, 256});
  const at::Tensor a = x0.clone().requires_grad_(true);
  ms(kind, a, 1e-6).backward(dy);
  const at::Tensor r = x0.to(at::kDouble).requires_grad_(true);
  stock(kind, r, 1e-6).backward(dy.to(at::kDouble));
  EXPECT_TRUE(memfit::test::close(a.grad(), r.grad(), 2e-5, 1e-6));
}

TEST_P(MsNormTest, KeepsOnlyOneFloatPerRowBeyondItsOutput) {
  const Kind kind = GetParam();
  const at::Tensor leaf = at::randn({4, 50, 768}).requires_grad_(true);
  const int64_t rows = 4 * 50;
  // The output is kept too, but it is the output: whoever consumes it holds it anyway.
  EXPECT_EQ(memfit::test::kept_bytes(leaf, [&](const at::Tensor& x) { return ms(kind, x, 1e-5); }),
            rows * 4);
  // The stock op keeps its input (and, for LayerNorm, mean and rstd per row).
  const int64_t stock_kept =
      memfit::test::kept_bytes(leaf, [&](const at::Tensor& x) { return stock(kind, x, 1e-5); });
  EXPECT_GE(stock_kept, static_cast<int64_t>(leaf.nbytes()));
}

TEST_P(MsNormTest, ReducedPrecisionAndShapes) {
  const Kind kind = GetParam();
  at::manual_seed(7);
  const at::Tensor x0 = at::randn({6, 512});
  const at::Tensor dy = at::randn({6, 512});
  for (at::ScalarType st : {at::kBFloat16, at::kHalf}) {
    const at::Tensor a = x0.to(st).requires_grad_(true);
    const at::Tensor y = ms(kind, a, 1e-5);
    ASSERT_EQ(y.scalar_type(), st);
    const at::Tensor r = x0.to(st).to(at::kFloat).requires_grad_(true);
    const at::Tensor yr = stock(kind, r, 1e-5);
    const double tol = st == at::kBFloat16 ? 1e-2 : 2e-3;
    EXPECT_TRUE(memfit::test::close(y, yr, tol, tol)) << st;
    y.backward(dy.to(st));
    yr.backward(dy);
    EXPECT_TRUE(memfit::test::close(a.grad(), r.grad(), 4 * tol, 4 * tol)) << st;
  }
  // Non-contiguous input.
  const at::Tensor t = at::randn({64, 10}).t();
  EXPECT_TRUE(at::equal(ms(kind, t, 1e-5), ms(kind, t.contiguous(), 1e-5)));
  // Empty tensors: no rows, or rows of length zero.
  for (auto shape : std::vector<std::vector<int64_t>>{{0, 16}, {3, 0}}) {
    const at::Tensor e = at::randn(shape).requires_grad_(true);
    const at::Tensor y = ms(kind, e, 1e-5);
    EXPECT_EQ(y.sizes(), e.sizes());
    y.sum().backward();
    EXPECT_EQ(e.grad().sizes(), e.sizes());
  }
}

TEST_P(MsNormTest, BadInputNamesOpAndProblem) {
  const Kind kind = GetParam();
  const char* name = kind == Kind::kLayer ? "memfit::ops::ms_layer_norm" : "memfit::ops::ms_rms_norm";
  memfit::test::expect_error([&] { ms(kind, at::ones({2, 4}, at::kInt), 1e-5); }, {name, "Int"});
  memfit::test::expect_error([&] { ms(kind, at::scalar_tensor(1.0), 1e-5); }, {name, "dimension"});
  memfit::test::expect_error([&] { ms(kind, at::ones({2, 4}), -1.0); }, {name, "eps"});
}

INSTANTIATE_TEST_SUITE_P(Norms, MsNormTest, ::testing::Values(Kind::kLayer, Kind::kRms),
                         [](const auto& info) {
                           return info.param == Kind::kLayer ? "LayerNorm" : "RMSNorm";
                         });

}  // namespace
