// Transformer blocks in the four memory modes (bench/blocks.h): every mode keeps exactly
// the bytes docs/ACCOUNTING.md counts, all modes compute the same forward, and
// memfit-best's gradients are the exact ones.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "blocks.h"
#include "test_util.h"

namespace {

using memfit::bench::Block;
using memfit::bench::BlockShape;
using memfit::bench::Mode;

const Mode kModes[] = {Mode::kExactStockAttention, Mode::kExact, Mode::kPaper, Mode::kBest};

BlockShape small_vit() {
  BlockShape s = memfit::bench::vit_b16_block(2);
  s.seq = 13; s.d = 48; s.heads = s.kv_heads = 4; s.inter = 192; s.rank = 4;
  return s;
}

BlockShape small_llama(int64_t kv_heads) {
  BlockShape s = memfit::bench::llama7b_block(2, 11);
  s.d = 64; s.heads = 4; s.kv_heads = kv_heads; s.inter = 172; s.rank = 4;
  return s;
}

class BlockTest : public ::testing::TestWithParam<BlockShape> {};

TEST_P(BlockTest, EveryModeKeepsExactlyTheAccountedBytes) {
  const BlockShape s = GetParam();
  const Block block(s, 7);
  const at::Tensor leaf = at::randn({s.batch, s.seq, s.d}).requires_grad_(true);
  for (Mode m : kModes) {
    const int64_t kept = memfit::test::kept_bytes(leaf, [&](const at::Tensor& x) { return block.forward(x, m); });
    EXPECT_EQ(kept, memfit::bench::expected_kept_bytes(s, m).total) << memfit::bench::mode_name(m);
  }
  // The paper's modes keep strictly less than exact, memfit-best least of all.
  const auto exact = memfit::bench::expected_kept_bytes(s, Mode::kExact).total;
  const auto paper = memfit::bench::expected_kept_bytes(s, Mode::kPaper).total;
  const auto best = memfit::bench::expected_kept_bytes(s, Mode::kBest).total;
  EXPECT_LT(paper, exact);
  EXPECT_LT(best, paper);
}

TEST_P(BlockTest, ModesComputeTheSameForwardAndBestHasExactGradients) {
  const BlockShape s = GetParam();
  const Block block(s, 8);
  const at::Tensor x0 = at::randn({s.batch, s.seq, s.d});
  const at::Tensor dy = at::randn({s.batch, s.seq, s.d});
  std::vector<at::Tensor> outs, dxs;
  std::vector<std::vector<at::Tensor>> lora_grads;
  for (Mode m : kModes) {
    block.zero_grad();
    const at::Tensor x = x0.clone().requires_grad_(true);
    const at::Tensor y = block.forward(x, m);
    y.backward(dy);
    outs.push_back(y.detach());
    dxs.push_back(x.grad());
    std::vector<at::Tensor> g;
    for (const at::Tensor& t : block.trainable()) g.push_back(t.grad().clone());
    lora_grads.push_back(g);
  }
  for (size_t i = 1; i < outs.size(); ++i) {
    EXPECT_TRUE(memfit::test::close(outs[i], outs[0], 1e-4, 1e-4)) << memfit::bench::mode_name(kModes[i]);
  }
  // exact (1) and memfit-best (3): same gradients up to fp32 rounding.
  EXPECT_TRUE(memfit::test::close(dxs[3], dxs[1], 1e-3, 1e-4));
  for (size_t j = 0; j < lora_grads[1].size(); ++j) {
    EXPECT_TRUE(memfit::test::close(lora_grads[3][j], lora_grads[1][j], 1e-3, 1e-5)) << "LoRA tensor " << j;
  }
  // paper (2): approximate activation gradients, still pointing the same way.
  const double cos = at::cosine_similarity(dxs[2].flatten(), dxs[1].flatten(), 0).item<double>();
  EXPECT_GT(cos, 0.95);
}

INSTANTIATE_TEST_SUITE_P(Shapes, BlockTest,
                         ::testing::Values(small_vit(), small_llama(4), small_llama(2)),
                         [](const auto& info) {
                           return info.param.arch == memfit::bench::Arch::kViT
                                      ? std::string("ViT")
                                      : std::string("LLaMA_kv") + std::to_string(info.param.kv_heads);
                         });

}  // namespace
