// MS-LayerNorm / MS-RMSNorm: outputs and gradients equal LibTorch's own; kept bytes.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>

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

// Explicit float64 reference: two-pass statistics in double, gradients by autograd.
at::Tensor reference64(Kind kind, const at::Tensor& x, double eps) {
  if (kind == Kind::kRms) return x * at::rsqrt(x.pow(2).mean(-1, true) + eps);
  const at::Tensor d = x - x.mean(-1, true);
  return d * at::rsqrt(d.pow(2).mean(-1, true) + eps);
}

struct Errors {
  double out, dx;  // max |y - y64|; max |dx - dx64| / max |dx64|
};

// y and dx of the op on fp32 x against the float64 reference on the same values.
Errors errors_against_float64(Kind kind, const at::Tensor& x0, const at::Tensor& dy, double eps) {
  const at::Tensor a = x0.clone().requires_grad_(true);
  const at::Tensor y = ms(kind, a, eps);
  y.backward(dy);
  const at::Tensor r = x0.to(at::kDouble).requires_grad_(true);
  const at::Tensor yr = reference64(kind, r, eps);
  yr.backward(dy.to(at::kDouble));
  const double dx_scale = std::max(r.grad().abs().max().item<double>(), 1e-300);
  return {(y.to(at::kDouble) - yr).abs().max().item<double>(),
          (a.grad().to(at::kDouble) - r.grad()).abs().max().item<double>() / dx_scale};
}

// A constant row has variance exactly 0: LayerNorm's output is exactly 0 and dx is
// r * (g - mean(g)) with r = 1 / sqrt(eps), even at BERT's eps 1e-12 (where an fp32 mean
// off by one rounding made the output reach 0.99).
TEST_P(MsNormTest, ConstantRowsMatchFloat64) {
  const Kind kind = GetParam();
  for (int64_t width : {768, 4096}) {
    for (double eps : {1e-12, 1e-5}) {
      at::manual_seed(8);
      const at::Tensor c = at::tensor({0.1f, -0.7f, 1.3f, 3.14159f, -1234.567f, 1e-3f, 77.7f, 0.0f}).view({8, 1});
      const at::Tensor x0 = c.expand({8, width}).contiguous();
      const at::Tensor dy = at::randn({8, width});
      const Errors e = errors_against_float64(kind, x0, dy, eps);
      EXPECT_LE(e.out, 1e-6) << "width " << width << " eps " << eps;
      EXPECT_LE(e.dx, 1e-5) << "width " << width << " eps " << eps;
      if (kind == Kind::kLayer) {
        EXPECT_EQ(ms(kind, x0, eps).abs().max().item<float>(), 0.0f);
      }
    }
  }
}

// Rows far from zero with a small spread: the mean must be formed without fp32 rounding.
TEST_P(MsNormTest, OffsetRowsMatchFloat64) {
  const Kind kind = GetParam();
  at::manual_seed(9);
  const at::Tensor x0 = at::randn({16, 768}) * 0.01 + 1000.0;
  const at::Tensor dy = at::randn({16, 768});
  const Errors e = errors_against_float64(kind, x0, dy, 1e-12);
  EXPECT_LE(e.out, 1e-4);
  EXPECT_LE(e.dx, 1e-4);
}

// |x| from 1e18 to 1e30: the sum of squares overflows fp32 (it returned 0 before).
TEST_P(MsNormTest, HugeRowsMatchFloat64) {
  const Kind kind = GetParam();
  for (double mag : {1e18, 1e20, 1e25, 1e30}) {
    for (int64_t width : {768, 4096}) {
      at::manual_seed(10);
      const at::Tensor x0 = (at::randn({4, width}, at::kDouble) * mag + 0.5 * mag).to(at::kFloat);
      const at::Tensor dy = at::randn({4, width});
      const Errors e = errors_against_float64(kind, x0, dy, 1e-5);
      EXPECT_LE(e.out, 1e-5) << "magnitude " << mag << " width " << width;
      EXPECT_LE(e.dx, 1e-5) << "magnitude " << mag << " width " << width;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Norms, MsNormTest, ::testing::Values(Kind::kLayer, Kind::kRms),
                         [](const auto& info) {
                           return info.param == Kind::kLayer ? "LayerNorm" : "RMSNorm";
                         });

}  // namespace
