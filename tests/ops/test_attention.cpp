// Memory-efficient attention: exact against a float64 composite, what it keeps, and
// that chunking bounds the transient.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <limits>

#include "memory_meter.h"
#include "ops.h"
#include "test_util.h"

namespace {

// softmax(q k^T * scale + mask) v, written out with stock ops; q [B,S,H,D], k/v [B,Sk,Hk,D].
at::Tensor reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                     const at::Tensor& kpm) {
  const int64_t H = q.size(2), Hk = k.size(2), S = q.size(1), Sk = k.size(1);
  const at::Tensor kk = k.repeat_interleave(H / Hk, 2), vv = v.repeat_interleave(H / Hk, 2);
  at::Tensor s = at::matmul(q.transpose(1, 2), kk.transpose(1, 2).transpose(2, 3)) /
                 std::sqrt(static_cast<double>(q.size(3)));
  at::Tensor hidden = at::zeros({S, Sk}, at::kBool);
  if (causal) hidden = at::ones({S, Sk}, at::kBool).triu(Sk - S + 1);
  at::Tensor h4 = hidden.view({1, 1, S, Sk});
  if (kpm.defined()) h4 = h4.logical_or(kpm.logical_not().view({q.size(0), 1, 1, Sk}));
  s = s.masked_fill(h4, -std::numeric_limits<double>::infinity());
  const at::Tensor p = at::softmax(s, -1);
  return at::matmul(p, vv.transpose(1, 2)).transpose(1, 2);
}

struct Case {
  int64_t B, S, Sk, H, Hk, D;
  bool causal;
  bool padding;
  int64_t chunk_bytes;
};

using memfit::ops::AttentionImpl;

class AttentionTest : public ::testing::TestWithParam<std::tuple<Case, AttentionImpl>> {};

TEST_P(AttentionTest, ForwardAndGradientsMatchFloat64Composite) {
  const Case c = std::get<0>(GetParam());
  at::manual_seed(21);
  const at::Tensor q0 = at::randn({c.B, c.S, c.H, c.D}), k0 = at::randn({c.B, c.Sk, c.Hk, c.D});
  const at::Tensor v0 = at::randn({c.B, c.Sk, c.Hk, c.D}), dy = at::randn({c.B, c.S, c.H, c.D});
  at::Tensor kpm;
  if (c.padding) {
    kpm = at::ones({c.B, c.Sk}, at::kBool);
    kpm[0].narrow(0, c.Sk - 3, 3).fill_(false);
  }
  const at::Tensor q = q0.clone().requires_grad_(true), k = k0.clone().requires_grad_(true),
                   v = v0.clone().requires_grad_(true);
  memfit::ops::AttentionOptions o;
  o.causal = c.causal;
  o.key_padding_mask = kpm;
  o.chunk_bytes = c.chunk_bytes;
  o.impl = std::get<1>(GetParam());
  const at::Tensor y = memfit::ops::attention(q, k, v, o);
  ASSERT_TRUE(y.is_contiguous());
  const at::Tensor qr = q0.to(at::kDouble).requires_grad_(true), kr = k0.to(at::kDouble).requires_grad_(true),
                   vr = v0.to(at::kDouble).requires_grad_(true);
  const at::Tensor yr = reference(qr, kr, vr, c.causal, kpm);
  EXPECT_TRUE(memfit::test::close(y, yr, 1e-4, 1e-5));
  y.backward(dy);
  yr.backward(dy.to(at::kDouble));
  EXPECT_TRUE(memfit::test::close(q.grad(), qr.grad(), 1e-4, 1e-5));
  EXPECT_TRUE(memfit::test::close(k.grad(), kr.grad(), 1e-4, 1e-5));
  EXPECT_TRUE(memfit::test::close(v.grad(), vr.grad(), 1e-4, 1e-5));
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, AttentionTest,
    ::testing::Combine(
        ::testing::Values(Case{2, 17, 17, 4, 4, 8, false, false, 16 << 20},
                          Case{2, 33, 33, 4, 4, 16, true, false, 16 << 20},
                          Case{1, 40, 40, 8, 2, 8, true, false, 4096},      // GQA, many chunks
                          Case{3, 12, 20, 2, 1, 8, false, true, 16 << 20},  // S != Sk, padding
                          Case{2, 9, 9, 3, 3, 4, true, true, 1},           // one row per chunk
                          Case{1, 25, 30, 4, 2, 8, true, false, 700},
                          Case{1, 300, 300, 2, 1, 8, true, false, 16 << 20}),  // causal chunks
        ::testing::Values(AttentionImpl::kBatched, AttentionImpl::kPerHead)),
    [](const auto& info) {
      return "case" + std::to_string(info.index) +
             (std::get<1>(info.param) == AttentionImpl::kBatched ? "_batched" : "_per_head");
    });

// Causal alignment is bottom-right (PyTorch's is_causal with a KV cache, flash-attn):
// query i sees key j iff j <= i + (Sk - S). With S > Sk the first S - Sk queries see no
// key: their output and every gradient through them are 0. The reference masks
// explicitly in float64 and zeroes such rows itself (softmax of an all -inf row is NaN).
at::Tensor causal_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  const int64_t H = q.size(2), Hk = k.size(2), S = q.size(1), Sk = k.size(1);
  const at::Tensor kk = k.repeat_interleave(H / Hk, 2), vv = v.repeat_interleave(H / Hk, 2);
  const at::Tensor s = at::matmul(q.transpose(1, 2), kk.transpose(1, 2).transpose(2, 3)) /
                       std::sqrt(static_cast<double>(q.size(3)));
  at::Tensor visible = at::zeros({S, Sk}, at::kBool);
  for (int64_t i = 0; i < S; ++i) {
    const int64_t n = std::clamp<int64_t>(i + (Sk - S) + 1, 0, Sk);  // keys 0 .. i + Sk - S
    if (n > 0) visible[i].narrow(0, 0, n).fill_(true);
  }
  const at::Tensor any = visible.any(-1, /*keepdim=*/true);  // [S, 1]
  const at::Tensor masked = s.masked_fill(visible.logical_not(), -std::numeric_limits<double>::infinity())
                                .masked_fill(any.logical_not(), 0.0);
  const at::Tensor p = at::softmax(masked, -1) * any.to(at::kDouble);
  return at::matmul(p, vv.transpose(1, 2)).transpose(1, 2);
}

struct CausalCase {
  int64_t B, S, Sk, H, Hk, D;
  int64_t chunk_bytes;
};

class CausalAlignmentTest
    : public ::testing::TestWithParam<std::tuple<CausalCase, AttentionImpl, int>> {};

TEST_P(CausalAlignmentTest, MatchesBottomRightFloat64Reference) {
  const CausalCase c = std::get<0>(GetParam());
  const int threads = std::get<2>(GetParam());
  const int saved_threads = at::get_num_threads();
  at::set_num_threads(threads);
  at::manual_seed(31);
  const at::Tensor q0 = at::randn({c.B, c.S, c.H, c.D}), k0 = at::randn({c.B, c.Sk, c.Hk, c.D});
  const at::Tensor v0 = at::randn({c.B, c.Sk, c.Hk, c.D}), dy = at::randn({c.B, c.S, c.H, c.D});
  const at::Tensor q = q0.clone().requires_grad_(true), k = k0.clone().requires_grad_(true),
                   v = v0.clone().requires_grad_(true);
  memfit::ops::AttentionOptions o;
  o.causal = true;
  o.chunk_bytes = c.chunk_bytes;
  o.impl = std::get<1>(GetParam());
  const at::Tensor y = memfit::ops::attention(q, k, v, o);
  y.backward(dy);
  at::set_num_threads(saved_threads);
  const at::Tensor qr = q0.to(at::kDouble).requires_grad_(true), kr = k0.to(at::kDouble).requires_grad_(true),
                   vr = v0.to(at::kDouble).requires_grad_(true);
  const at::Tensor yr = causal_reference(qr, kr, vr);
  yr.backward(dy.to(at::kDouble));
  const auto err = [](const at::Tensor& a, const at::Tensor& b) {
    return (a.to(at::kDouble) - b).abs().max().item<double>();
  };
  EXPECT_TRUE(memfit::test::close(y, yr, 1e-4, 1e-5)) << "max |err| out " << err(y, yr);
  EXPECT_TRUE(memfit::test::close(q.grad(), qr.grad(), 1e-4, 1e-5)) << "max |err| dq " << err(q.grad(), qr.grad());
  EXPECT_TRUE(memfit::test::close(k.grad(), kr.grad(), 1e-4, 1e-5)) << "max |err| dk " << err(k.grad(), kr.grad());
  EXPECT_TRUE(memfit::test::close(v.grad(), vr.grad(), 1e-4, 1e-5)) << "max |err| dv " << err(v.grad(), vr.grad());
  if (c.S > c.Sk) {  // the first S - Sk queries see no key: exactly 0, no NaN
    EXPECT_EQ(y.narrow(1, 0, c.S - c.Sk).abs().max().item<float>(), 0.0f);
    EXPECT_EQ(q.grad().narrow(1, 0, c.S - c.Sk).abs().max().item<float>(), 0.0f);
  }
  EXPECT_FALSE(k.grad().isnan().any().item<bool>());
  EXPECT_FALSE(v.grad().isnan().any().item<bool>());
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, CausalAlignmentTest,
    ::testing::Combine(
        ::testing::Values(CausalCase{1, 129, 77, 2, 1, 8, 16 << 20},   // S > Sk, GQA (issue 11)
                          CausalCase{2, 129, 77, 4, 2, 8, 24640},      // S > Sk, chunks of 10-40 queries
                          CausalCase{1, 77, 129, 2, 1, 8, 16 << 20},   // S < Sk
                          CausalCase{2, 40, 90, 4, 2, 8, 28800},       // S < Sk, chunks of 10-40 queries
                          CausalCase{2, 64, 64, 4, 2, 8, 16 << 20},    // S == Sk
                          CausalCase{1, 1, 50, 4, 2, 8, 16 << 20},     // one query: sees every key
                          CausalCase{2, 50, 1, 4, 2, 8, 16 << 20},     // one key: only the last query sees it
                          CausalCase{1, 1, 1, 2, 1, 8, 16 << 20}),
        ::testing::Values(AttentionImpl::kAuto, AttentionImpl::kBatched, AttentionImpl::kPerHead),
        ::testing::Values(1, 2)),
    [](const auto& info) {
      const CausalCase& c = std::get<0>(info.param);
      const AttentionImpl impl = std::get<1>(info.param);
      return "S" + std::to_string(c.S) + "_Sk" + std::to_string(c.Sk) + "_B" + std::to_string(c.B) + "_Hk" +
             std::to_string(c.Hk) + "_chunk" + std::to_string(c.chunk_bytes) +
             (impl == AttentionImpl::kAuto ? "_auto" : impl == AttentionImpl::kBatched ? "_batched" : "_per_head") +
             "_t" + std::to_string(std::get<2>(info.param));
    });

TEST(Attention, RowsThatSeeNoKeyOutputZero) {
  const at::Tensor q = at::randn({1, 4, 2, 8}).requires_grad_(true);
  const at::Tensor k = at::randn({1, 5, 2, 8}).requires_grad_(true), v = at::randn({1, 5, 2, 8}).requires_grad_(true);
  memfit::ops::AttentionOptions o;
  o.key_padding_mask = at::zeros({1, 5}, at::kBool);
  const at::Tensor y = memfit::ops::attention(q, k, v, o);
  EXPECT_EQ(y.abs().sum().item<float>(), 0.0f);
  y.sum().backward();
  EXPECT_EQ(q.grad().abs().sum().item<float>(), 0.0f);
  EXPECT_FALSE(k.grad().isnan().any().item<bool>());
}

TEST(Attention, KeepsQkvOutputAndOneLogsumexpPerRow) {
  const int64_t B = 2, S = 64, H = 4, D = 16;
  const at::Tensor ql = at::randn({B, S, H, D}).requires_grad_(true);
  const at::Tensor kl = at::randn({B, S, H, D}).requires_grad_(true);
  const at::Tensor vl = at::randn({B, S, H, D}).requires_grad_(true);
  const int64_t t = static_cast<int64_t>(ql.nbytes());
  const int64_t before = memfit::test::current_bytes();
  at::Tensor out;
  {
    const at::Tensor q = ql.clone(), k = kl.clone(), v = vl.clone();
    out = memfit::ops::attention(q, k, v);
  }
  // q, k, v + lse [B, H, S] fp32; the output is returned (and kept) but not counted here.
  EXPECT_EQ(memfit::test::current_bytes() - before - static_cast<int64_t>(out.nbytes()), 3 * t + B * H * S * 4);
}

TEST(Attention, ChunkingBoundsTheTransientPeak) {
  const int64_t B = 1, S = 512, H = 4, D = 16;
  const at::Tensor q = at::randn({B, S, H, D}).requires_grad_(true);
  const at::Tensor k = at::randn({B, S, H, D}).requires_grad_(true);
  const at::Tensor v = at::randn({B, S, H, D}).requires_grad_(true);
  const int64_t full_scores = H * S * S * 4;  // 4 MiB: every head's scores at once
  auto peak_of = [&](int64_t chunk_bytes, AttentionImpl impl) {
    memfit::ops::AttentionOptions o;
    o.chunk_bytes = chunk_bytes;
    o.impl = impl;
    const int64_t before = memfit::test::current_bytes();
    memfit::ops::MemoryMeter::reset_peak();
    const at::Tensor y = memfit::ops::attention(q, k, v, o);
    y.backward(at::ones_like(y));
    return memfit::ops::MemoryMeter::stats().peak_bytes - before;
  };
  // Batched: backward holds about two score blocks of every head; with a sixteenth of
  // the budget the peak drops by most of them.
  const int64_t small = peak_of(full_scores / 16, AttentionImpl::kBatched);
  const int64_t big = peak_of(full_scores, AttentionImpl::kBatched);
  EXPECT_LT(small, big - full_scores / 2);
  EXPECT_LT(small, full_scores);
  // Per head: at most one task's blocks per thread are alive, and how many threads hold
  // theirs at the same moment depends on scheduling, so only the bounds are exact.
  const int64_t small_ph = peak_of(full_scores / 16, AttentionImpl::kPerHead);
  const int64_t big_ph = peak_of(full_scores, AttentionImpl::kPerHead);
  EXPECT_LT(small_ph, big_ph);
  EXPECT_LT(small_ph, full_scores / 2);
}

TEST(Attention, Bf16CloseToFloat) {
  at::manual_seed(22);
  const at::Tensor q = at::randn({1, 16, 2, 8}), k = at::randn({1, 16, 2, 8}), v = at::randn({1, 16, 2, 8});
  memfit::ops::AttentionOptions o;
  o.causal = true;
  const at::Tensor y = memfit::ops::attention(q.to(at::kBFloat16), k.to(at::kBFloat16), v.to(at::kBFloat16), o);
  EXPECT_EQ(y.scalar_type(), at::kBFloat16);
  EXPECT_TRUE(memfit::test::close(y, memfit::ops::attention(q, k, v, o), 3e-2, 3e-2));
}

TEST(Attention, NonContiguousInputsAndEmptyBatches) {
  at::manual_seed(24);
  // q, k, v as views of one fused qkv projection [B, S, 3, H, D].
  const at::Tensor qkv = at::randn({2, 7, 3, 4, 8});
  const at::Tensor q = qkv.select(2, 0), k = qkv.select(2, 1), v = qkv.select(2, 2);
  ASSERT_FALSE(q.is_contiguous());
  EXPECT_TRUE(memfit::test::close(memfit::ops::attention(q, k, v),
                                  memfit::ops::attention(q.contiguous(), k.contiguous(), v.contiguous()), 1e-6, 1e-7));
  // head_dim strided (every other element): each implementation reads it as such.
  const at::Tensor wide = at::randn({2, 9, 3, 4, 16});
  const at::Tensor qs = wide.select(2, 0).slice(3, 0, 16, 2), ks = wide.select(2, 1).slice(3, 0, 16, 2),
                   vs = wide.select(2, 2).slice(3, 0, 16, 2);
  ASSERT_EQ(qs.stride(3), 2);
  const at::Tensor dy = at::randn({2, 9, 4, 8});
  for (const AttentionImpl impl : {AttentionImpl::kAuto, AttentionImpl::kBatched, AttentionImpl::kPerHead}) {
    memfit::ops::AttentionOptions o;
    o.causal = true;
    o.impl = impl;
    const at::Tensor leaf = wide.clone().requires_grad_(true), b = qs.contiguous().requires_grad_(true);
    const at::Tensor a = leaf.select(2, 0).slice(3, 0, 16, 2);  // strided like qs
    ASSERT_EQ(a.stride(3), 2);
    const at::Tensor ya = memfit::ops::attention(a, ks, vs, o);
    const at::Tensor yb = memfit::ops::attention(b, ks.contiguous(), vs.contiguous(), o);
    EXPECT_TRUE(memfit::test::close(ya, yb, 1e-6, 1e-7)) << static_cast<int>(impl);
    ya.backward(dy);
    yb.backward(dy);
    EXPECT_TRUE(memfit::test::close(leaf.grad().select(2, 0).slice(3, 0, 16, 2), b.grad(), 1e-6, 1e-7))
        << static_cast<int>(impl);
  }
  const at::Tensor e = at::randn({0, 5, 2, 4}).requires_grad_(true);
  const at::Tensor ye = memfit::ops::attention(e, e, e);
  EXPECT_EQ(ye.sizes(), e.sizes());
  ye.sum().backward();
  EXPECT_EQ(e.grad().sizes(), e.sizes());
  const at::Tensor s0 = at::randn({1, 0, 2, 4}).requires_grad_(true);
  EXPECT_EQ(memfit::ops::attention(s0, s0, s0).sizes(), s0.sizes());
}

TEST(Attention, BadInputNamesTheProblem) {
  const at::Tensor q = at::randn({1, 4, 4, 8}), k = at::randn({1, 4, 3, 8});
  memfit::test::expect_error([&] { memfit::ops::attention(q, k, k); }, {"memfit::ops::attention", "multiple"});
  memfit::test::expect_error([&] { memfit::ops::attention(q.view({4, 4, 8}), q, q); }, {"memfit::ops::attention", "q must be"});
  memfit::test::expect_error([&] { memfit::ops::attention(q, q, q.to(at::kBFloat16)); }, {"memfit::ops::attention", "dtype"});
  memfit::ops::AttentionOptions o;
  o.key_padding_mask = at::ones({1, 3}, at::kBool);
  memfit::test::expect_error([&] { memfit::ops::attention(q, q, q, o); }, {"key_padding_mask", "[1, 4]"});
  memfit::ops::AttentionOptions meta;
  meta.impl = AttentionImpl::kPerHead;
  const at::Tensor qm = at::empty({1, 4, 4, 8}, at::Device(at::kMeta));
  memfit::test::expect_error([&] { memfit::ops::attention(qm, qm, qm, meta); }, {"memfit::ops::attention", "meta"});
}

}  // namespace
