// Fused MLP tails: exact gradients against composites, and exactly what they keep.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "ops.h"
#include "test_util.h"

namespace {

using memfit::ops::LinearWeights;
using memfit::ops::MlpAct;

TEST(FusedMlp, ActLinearMatchesCompositeForGeluAndSilu) {
  for (MlpAct act : {MlpAct::kGELU, MlpAct::kSiLU, MlpAct::kGELUTanh}) {
    at::manual_seed(16);
    const at::Tensor w = at::randn({40, 120}) * 0.05;
    const at::Tensor a = (at::randn({4, 120}) * 0.1).requires_grad_(true);
    const at::Tensor b = (at::randn({40, 4}) * 0.1).requires_grad_(true);
    const at::Tensor a2 = a.detach().clone().requires_grad_(true), b2 = b.detach().clone().requires_grad_(true);
    const at::Tensor z0 = at::randn({3, 5, 120}) * 2.0, dy = at::randn({3, 5, 40});
    const at::Tensor za = z0.clone().requires_grad_(true), zb = z0.clone().requires_grad_(true);
    const at::Tensor ya = memfit::ops::act_linear(act, za, LinearWeights::lora(w, at::Tensor(), a, b, 1.5), true);
    const at::Tensor h = act == MlpAct::kGELU ? at::gelu(zb) : act == MlpAct::kSiLU ? at::silu(zb) : at::gelu(zb, "tanh");
    const at::Tensor yb = at::linear(h, w) + 1.5 * at::linear(at::linear(h, a2), b2);
    EXPECT_TRUE(memfit::test::close(ya, yb, 1e-5, 1e-6));
    ya.backward(dy);
    yb.backward(dy);
    EXPECT_TRUE(memfit::test::close(za.grad(), zb.grad(), 1e-4, 1e-6));
    EXPECT_TRUE(memfit::test::close(a.grad(), a2.grad(), 1e-4, 1e-6));
    EXPECT_TRUE(memfit::test::close(b.grad(), b2.grad(), 1e-4, 1e-6));
  }
}

TEST(FusedMlp, SwigluLinearMatchesComposite) {
  at::manual_seed(17);
  const int64_t d = 64, inter = 172;
  const at::Tensor w = at::randn({d, inter}) * 0.05;
  const at::Tensor a = (at::randn({8, inter}) * 0.1).requires_grad_(true);
  const at::Tensor b = (at::randn({d, 8}) * 0.1).requires_grad_(true);
  const at::Tensor a2 = a.detach().clone().requires_grad_(true), b2 = b.detach().clone().requires_grad_(true);
  const at::Tensor g0 = at::randn({2, 9, inter}) * 3.0, u0 = at::randn({2, 9, inter});
  const at::Tensor dy = at::randn({2, 9, d});
  const at::Tensor ga = g0.clone().requires_grad_(true), ua = u0.clone().requires_grad_(true);
  const at::Tensor gb = g0.clone().requires_grad_(true), ub = u0.clone().requires_grad_(true);
  const at::Tensor ya = memfit::ops::swiglu_linear(ga, ua, LinearWeights::lora(w, at::Tensor(), a, b, 2.0), true);
  const at::Tensor h = at::silu(gb) * ub;
  const at::Tensor yb = at::linear(h, w) + 2.0 * at::linear(at::linear(h, a2), b2);
  EXPECT_TRUE(memfit::test::close(ya, yb, 1e-5, 1e-6));
  ya.backward(dy);
  yb.backward(dy);
  EXPECT_TRUE(memfit::test::close(ga.grad(), gb.grad(), 1e-4, 1e-6));
  EXPECT_TRUE(memfit::test::close(ua.grad(), ub.grad(), 1e-4, 1e-6));
  EXPECT_TRUE(memfit::test::close(a.grad(), a2.grad(), 1e-4, 1e-6));
  EXPECT_TRUE(memfit::test::close(b.grad(), b2.grad(), 1e-4, 1e-6));
}

TEST(FusedMlp, SwigluKeepsExactlyGateAndUp) {
  at::manual_seed(18);
  const int64_t d = 128, inter = 344;
  const at::Tensor w = at::randn({d, inter}) * 0.05;
  const at::Tensor a = (at::randn({8, inter}) * 0.1).requires_grad_(true);
  const at::Tensor b = (at::randn({d, 8}) * 0.1).requires_grad_(true);
  const at::Tensor gl = at::randn({4, 16, inter}).requires_grad_(true);
  const at::Tensor ul = at::randn({4, 16, inter}).requires_grad_(true);
  const int64_t one = static_cast<int64_t>(gl.nbytes());
  const int64_t before = memfit::test::current_bytes();
  at::Tensor out;
  {
    const at::Tensor g = gl.clone(), u = ul.clone();
    out = memfit::ops::swiglu_linear(g, u, LinearWeights::lora(w, at::Tensor(), a, b, 1.0), true);
  }
  EXPECT_EQ(memfit::test::current_bytes() - before - static_cast<int64_t>(out.nbytes()), 2 * one);
  out = at::Tensor();
  // The stock composite keeps g (SiLU), silu(g) and u (product) and h (LoRA down input),
  // plus the rank-8 intermediate.
  const int64_t before2 = memfit::test::current_bytes();
  {
    const at::Tensor g = gl.clone(), u = ul.clone();
    const at::Tensor h = at::silu(g) * u;
    out = at::linear(h, w) + at::linear(at::linear(h, a), b);
  }
  EXPECT_EQ(memfit::test::current_bytes() - before2 - static_cast<int64_t>(out.nbytes()),
            4 * one + 4 * 16 * 8 * 4);
}

TEST(FusedMlp, ActLinearKeepsOnlyThePreActivation) {
  const at::Tensor w = at::randn({32, 128});
  const at::Tensor a = at::randn({4, 128}).requires_grad_(true), b = at::randn({32, 4}).requires_grad_(true);
  const at::Tensor leaf = at::randn({6, 10, 128}).requires_grad_(true);
  EXPECT_EQ(memfit::test::kept_bytes(leaf, [&](const at::Tensor& z) {
              return memfit::ops::act_linear(MlpAct::kGELU, z, LinearWeights::lora(w, at::Tensor(), a, b, 1.0), true);
            }), static_cast<int64_t>(leaf.nbytes()));
}

TEST(FusedMlp, NonContiguousEmptyAndBf16Inputs) {
  at::manual_seed(23);
  const at::Tensor w = at::randn({16, 40}) * 0.1;
  const LinearWeights down = LinearWeights::lora(w, at::Tensor(), (at::randn({4, 40}) * 0.1).requires_grad_(true),
                                                 (at::randn({16, 4}) * 0.1).requires_grad_(true), 1.0);
  // g and u as strided halves of one fused gate_up projection.
  const at::Tensor gu = at::randn({6, 80});
  const at::Tensor g = gu.narrow(1, 0, 40), u = gu.narrow(1, 40, 40);
  ASSERT_FALSE(g.is_contiguous());
  EXPECT_TRUE(memfit::test::close(memfit::ops::swiglu_linear(g, u, down, true),
                                  memfit::ops::swiglu_linear(g.contiguous(), u.contiguous(), down, true), 1e-6, 1e-7));
  const at::Tensor zt = at::randn({40, 6}).t();
  EXPECT_TRUE(memfit::test::close(memfit::ops::act_linear(MlpAct::kSiLU, zt, down, true),
                                  memfit::ops::act_linear(MlpAct::kSiLU, zt.contiguous(), down, true), 1e-6, 1e-7));
  // Empty batch: shapes flow through forward and backward.
  const at::Tensor ge = at::randn({0, 40}).requires_grad_(true), ue = at::randn({0, 40}).requires_grad_(true);
  const at::Tensor ye = memfit::ops::swiglu_linear(ge, ue, down, true);
  EXPECT_EQ(ye.sizes(), at::IntArrayRef({0, 16}));
  ye.sum().backward();
  EXPECT_EQ(ge.grad().sizes(), ge.sizes());
  // bf16 storage, fp32 compute: close to the fp32 result.
  const LinearWeights down16 = LinearWeights::lora(w.to(at::kBFloat16), at::Tensor(), down.lora_a.detach().to(at::kBFloat16),
                                                   down.lora_b.detach().to(at::kBFloat16), 1.0);
  const at::Tensor y16 = memfit::ops::swiglu_linear(g.to(at::kBFloat16), u.to(at::kBFloat16), down16, true);
  EXPECT_EQ(y16.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(memfit::test::close(y16, memfit::ops::swiglu_linear(g, u, down, true), 3e-2, 3e-2));
}

TEST(FusedMlp, BadInputNamesOpAndProblem) {
  const at::Tensor w = at::randn({4, 8});
  memfit::test::expect_error(
      [&] { memfit::ops::swiglu_linear(at::randn({2, 8}), at::randn({3, 8}), LinearWeights::plain(w), true); },
      {"memfit::ops::swiglu_linear", "same shape"});
  memfit::test::expect_error(
      [&] { memfit::ops::act_linear(MlpAct::kGELU, at::randn({2, 5}), LinearWeights::plain(w), true); },
      {"memfit::ops::act_linear", "5", "8"});
}

}  // namespace
