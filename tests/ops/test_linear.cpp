// The memory-sharing linear and its LoRA branch: gradients against a plain LibTorch
// composite, what is kept, and the MS-norm -> LoRA sharing measured with the meter.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "ops.h"
#include "test_util.h"

namespace {

using memfit::ops::LinearWeights;

struct Lora {
  at::Tensor w, b, a, bb;
};

Lora make(int64_t in, int64_t out, int64_t r, bool trainable_w) {
  Lora l;
  l.w = (at::randn({out, in}) * 0.05).requires_grad_(trainable_w);
  l.b = (at::randn({out}) * 0.01).requires_grad_(trainable_w);
  l.a = (at::randn({r, in}) * 0.1).requires_grad_(true);
  l.bb = (at::randn({out, r}) * 0.1).requires_grad_(true);
  return l;
}

// The plain composite the PEFT library computes: base(x) + scale * B(A(dropout(x))).
at::Tensor composite(const at::Tensor& x, const Lora& l, double scale, const at::Tensor& xd) {
  return at::linear(x, l.w, l.b) + scale * at::linear(at::linear(xd, l.a), l.bb);
}

TEST(LoraLinear, GradientsMatchLibTorchComposite) {
  for (int variant = 0; variant < 3; ++variant) {
    const bool trainable_w = variant == 1;
    at::manual_seed(11);
    Lora l = make(80, 48, 8, trainable_w);
    if (variant == 2) l.b = at::Tensor();  // no bias: the LoRA factors' gradient slots shift
    const Lora c{l.w.detach().clone().requires_grad_(trainable_w),
                 l.b.defined() ? l.b.detach().clone().requires_grad_(trainable_w) : at::Tensor(),
                 l.a.detach().clone().requires_grad_(true), l.bb.detach().clone().requires_grad_(true)};
    const at::Tensor x0 = at::randn({4, 7, 80}), dy = at::randn({4, 7, 48});
    const at::Tensor xa = x0.clone().requires_grad_(true), xb = x0.clone().requires_grad_(true);
    const at::Tensor ya = memfit::ops::linear(xa, LinearWeights::lora(l.w, l.b, l.a, l.bb, 2.0), true);
    const at::Tensor yb = composite(xb, c, 2.0, xb);
    EXPECT_TRUE(memfit::test::close(ya, yb, 1e-5, 1e-6));
    ya.backward(dy);
    yb.backward(dy);
    EXPECT_TRUE(memfit::test::close(xa.grad(), xb.grad(), 1e-5, 1e-6));
    EXPECT_TRUE(memfit::test::close(l.a.grad(), c.a.grad(), 1e-5, 1e-6));
    EXPECT_TRUE(memfit::test::close(l.bb.grad(), c.bb.grad(), 1e-5, 1e-6));
    if (trainable_w) {
      EXPECT_TRUE(memfit::test::close(l.w.grad(), c.w.grad(), 1e-5, 1e-6));
      EXPECT_TRUE(memfit::test::close(l.b.grad(), c.b.grad(), 1e-5, 1e-6));
    } else {
      EXPECT_FALSE(l.w.grad().defined());
    }
  }
}

TEST(LoraLinear, DropoutGradientsMatchCompositeWithTheSameMask) {
  at::manual_seed(12);
  const Lora l = make(64, 32, 4, false);
  const Lora c{l.w, l.b, l.a.detach().clone().requires_grad_(true), l.bb.detach().clone().requires_grad_(true)};
  const at::Tensor x0 = at::randn({5, 64}), dy = at::randn({5, 32});
  const at::Tensor xa = x0.clone().requires_grad_(true), xb = x0.clone().requires_grad_(true);
  // Both draw their mask seed from the default generator: same seed, same mask.
  at::manual_seed(99);
  const at::Tensor ya = memfit::ops::linear(xa, LinearWeights::lora(l.w, l.b, l.a, l.bb, 0.5, 0.3), true);
  at::manual_seed(99);
  const at::Tensor yb = composite(xb, c, 0.5, memfit::ops::dropout(xb, 0.3, true));
  EXPECT_TRUE(memfit::test::close(ya, yb, 1e-5, 1e-6));
  ya.backward(dy);
  yb.backward(dy);
  EXPECT_TRUE(memfit::test::close(xa.grad(), xb.grad(), 1e-5, 1e-6));
  EXPECT_TRUE(memfit::test::close(l.a.grad(), c.a.grad(), 1e-5, 1e-6));
  EXPECT_TRUE(memfit::test::close(l.bb.grad(), c.bb.grad(), 1e-5, 1e-6));
  // In eval mode dropout is off.
  const at::Tensor ye = memfit::ops::linear(x0, LinearWeights::lora(l.w, l.b, l.a, l.bb, 0.5, 0.3), false);
  EXPECT_TRUE(memfit::test::close(ye, composite(x0, c, 0.5, x0), 1e-5, 1e-6));
}

// The backward replays dropout(x) with the forward's scale: at p = 0.999, where
// fl32(1 / (1 - fl32(p))) = 1000.0129 and 1 / (1 - p) = 1000 differ by 1.3e-5, the LoRA
// factors' gradients match the composite (whose dropout output is the forward's) closely.
TEST(LoraLinear, DropoutReplayUsesTheForwardScale) {
  at::manual_seed(13);
  const Lora l = make(512, 32, 4, false);
  const Lora c{l.w, l.b, l.a.detach().clone().requires_grad_(true), l.bb.detach().clone().requires_grad_(true)};
  const at::Tensor x0 = at::randn({64, 512}), dy = at::randn({64, 32});
  at::manual_seed(98);
  const at::Tensor ya = memfit::ops::linear(x0, LinearWeights::lora(l.w, l.b, l.a, l.bb, 0.5, 0.999), true);
  at::manual_seed(98);
  const at::Tensor yb = composite(x0, c, 0.5, memfit::ops::dropout(x0, 0.999, true));
  ya.backward(dy);
  yb.backward(dy);
  EXPECT_TRUE(memfit::test::close(l.a.grad(), c.a.grad(), 2e-6, 1e-9));
  EXPECT_TRUE(memfit::test::close(l.bb.grad(), c.bb.grad(), 2e-6, 1e-9));
}

TEST(LoraLinear, FrozenLinearKeepsNothingLoraKeepsOneInput) {
  at::manual_seed(13);
  const int64_t in = 256, out = 128;
  const at::Tensor leaf = at::randn({8, 16, in}).requires_grad_(true);
  const int64_t x_bytes = static_cast<int64_t>(leaf.nbytes());
  const Lora l = make(in, out, 8, false);
  // Frozen, no LoRA: nothing kept.
  EXPECT_EQ(memfit::test::kept_bytes(leaf, [&](const at::Tensor& x) {
              return memfit::ops::linear(x, LinearWeights::plain(l.w, l.b), true);
            }), 0);
  // Trainable weight: the input itself.
  const at::Tensor wt = l.w.detach().clone().requires_grad_(true);
  EXPECT_EQ(memfit::test::kept_bytes(leaf, [&](const at::Tensor& x) {
              return memfit::ops::linear(x, LinearWeights::plain(wt, l.b), true);
            }), x_bytes);
  // LoRA: exactly one input, not the rank-r intermediate.
  EXPECT_EQ(memfit::test::kept_bytes(leaf, [&](const at::Tensor& x) {
              return memfit::ops::linear(x, LinearWeights::lora(l.w, l.b, l.a, l.bb, 2.0), true);
            }), x_bytes);
  // LoRA with dropout: the input plus a 1-bit mask.
  EXPECT_EQ(memfit::test::kept_bytes(leaf, [&](const at::Tensor& x) {
              return memfit::ops::linear(x, LinearWeights::lora(l.w, l.b, l.a, l.bb, 2.0, 0.1), true);
            }), x_bytes + (leaf.numel() + 7) / 8);
  // The stock composite keeps the input and the [T, r] intermediate.
  EXPECT_EQ(memfit::test::kept_bytes(leaf, [&](const at::Tensor& x) { return composite(x, l, 2.0, x); }),
            x_bytes + 8 * 16 * 8 * 4);
}

TEST(LoraLinear, MsNormOutputAndLoraInputAreOneBuffer) {
  at::manual_seed(14);
  const int64_t d = 384;
  const at::Tensor leaf = at::randn({4, 32, d}).requires_grad_(true);
  const int64_t y_bytes = static_cast<int64_t>(leaf.nbytes()), rows = 4 * 32;
  const Lora q = make(d, d, 8, false), k = make(d, d, 8, false), v = make(d, d, 8, false);
  // MS-norm -> three LoRA projections (q, k, v): one y buffer kept, plus rstd.
  const int64_t kept = memfit::test::kept_bytes(leaf, [&](const at::Tensor& x) {
    const at::Tensor y = memfit::ops::ms_layer_norm(x, 1e-5);
    const at::Tensor oq = memfit::ops::linear(y, LinearWeights::lora(q.w, q.b, q.a, q.bb, 1.0), true);
    const at::Tensor ok = memfit::ops::linear(y, LinearWeights::lora(k.w, k.b, k.a, k.bb, 1.0), true);
    const at::Tensor ov = memfit::ops::linear(y, LinearWeights::lora(v.w, v.b, v.a, v.bb, 1.0), true);
    return at::cat({oq, ok, ov}, -1);
  });
  EXPECT_EQ(kept, y_bytes + rows * 4);
  // Stock layer_norm + stock LoRA composites keep the input, the norm output, mean and
  // rstd, and three rank-8 intermediates.
  const int64_t stock = memfit::test::kept_bytes(leaf, [&](const at::Tensor& x) {
    const at::Tensor y = at::layer_norm(x, {d}, {}, {}, 1e-5);
    return at::cat({composite(y, q, 1.0, y), composite(y, k, 1.0, y), composite(y, v, 1.0, y)}, -1);
  });
  EXPECT_EQ(stock, 2 * y_bytes + 2 * rows * 4 + 3 * rows * 8 * 4);
}

TEST(LoraLinear, BadInputNamesOpAndField) {
  const at::Tensor x = at::randn({2, 8});
  const at::Tensor w = at::randn({4, 8});
  memfit::test::expect_error([&] { memfit::ops::linear(at::randn({2, 7}), LinearWeights::plain(w), true); },
                             {"memfit::ops::linear", "7", "8"});
  memfit::test::expect_error([&] { memfit::ops::linear(x, LinearWeights::plain(w, at::randn({5})), true); },
                             {"memfit::ops::linear", "bias"});
  memfit::test::expect_error(
      [&] { memfit::ops::linear(x, LinearWeights::lora(w, at::Tensor(), at::randn({2, 8}), at::randn({4, 3}), 1.0), true); },
      {"memfit::ops::linear", "lora_b"});
  memfit::test::expect_error(
      [&] { memfit::ops::linear(x, LinearWeights::lora(w, at::Tensor(), at::randn({2, 8}), at::randn({4, 2}), 1.0, 1.0), true); },
      {"memfit::ops::linear", "lora_dropout"});
  memfit::test::expect_error([&] { memfit::ops::linear(x.to(at::kBFloat16), LinearWeights::plain(w), true); },
                             {"memfit::ops::linear", "weight", "BFloat16"});
  memfit::test::expect_error([&] { memfit::ops::linear(x.to(at::kLong), LinearWeights::plain(w), true); },
                             {"memfit::ops::linear", "Long"});
}

TEST(LoraLinear, Bf16AndEmptyBatch) {
  at::manual_seed(15);
  const Lora l = make(32, 16, 4, false);
  const at::Tensor x = at::randn({3, 32});
  const at::Tensor yb = memfit::ops::linear(
      x.to(at::kBFloat16),
      LinearWeights::lora(l.w.to(at::kBFloat16), l.b.to(at::kBFloat16), l.a.detach().to(at::kBFloat16), l.bb.detach().to(at::kBFloat16), 1.0),
      true);
  EXPECT_EQ(yb.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(memfit::test::close(yb, composite(x, l, 1.0, x), 3e-2, 3e-2));
  const at::Tensor e = at::randn({0, 32}).requires_grad_(true);
  const at::Tensor ye = memfit::ops::linear(e, LinearWeights::lora(l.w, l.b, l.a, l.bb, 1.0), true);
  EXPECT_EQ(ye.sizes(), at::IntArrayRef({0, 16}));
  ye.sum().backward();
  EXPECT_EQ(e.grad().sizes(), e.sizes());
}

}  // namespace
