// The estimator's autograd engine against LibTorch's rules, where they decide a peak:
// a leaf used twice (tied embeddings) holds its first gradient in the AccumulateGrad
// node's input buffer until the second arrives; 1.13 adds the two out of place, 2.x in
// place. And the fit plan's decision over every searched point.
#include <gtest/gtest.h>

#include "fit.h"
#include "sim.h"

namespace {

namespace est = memfit::estimator;
namespace sim = memfit::estimator::sim;

// loss = f(w) + g(w): two nodes, each returning an n-byte gradient for the same leaf.
int64_t backward_peak(bool in_place, bool grad_exists, int64_t* grad_bytes_after) {
  sim::Sim s(1);
  s.grad_buffer_in_place = in_place;
  const int64_t n = 1000;
  sim::Tensor w = s.empty(n / 4, 4);
  sim::Leaf* leaf = s.new_leaf(4, true);
  w.edge = sim::Edge{nullptr, 0, leaf};
  if (grad_exists) leaf->grad = s.empty(n / 4, 4);  // a later micro-batch of accumulation
  auto use = [&](sim::Tensor* out) {
    *out = s.empty(1, 4);
    s.record("use", {&w}, {out}, {}, [&s, n](sim::Grads&) { return sim::Grads{s.empty(n / 4, 4)}; });
  };
  sim::Tensor a, b;
  use(&a);
  use(&b);
  sim::Tensor loss = s.empty(1, 4);
  s.record("add", {&a, &b}, {&loss}, {}, [](sim::Grads& g) { return sim::Grads{g[0], g[0]}; });
  const int64_t before = s.timeline.current();
  s.timeline.begin("backward");
  s.backward(loss, s.empty(1, 4));
  s.timeline.end();
  *grad_bytes_after = leaf->grad.defined() ? leaf->grad.bytes() : 0;
  return s.timeline.phase_peaks().at("backward") - before;
}

TEST(SimEngine, TiedLeafBuffersItsFirstGradientAndAddsOutOfPlaceOn113) {
  int64_t grad = 0;
  // The buffer (1000), the second gradient (1000) and their sum (1000) at once; the seed
  // (4 bytes) went with the node that received it.
  EXPECT_EQ(backward_peak(/*in_place=*/false, /*grad_exists=*/false, &grad), 3000);
  EXPECT_EQ(grad, 1000);
  // A later micro-batch: .grad (counted before) stays; the same three buffers on top.
  EXPECT_EQ(backward_peak(false, true, &grad), 3000);
  EXPECT_EQ(grad, 1000);
}

TEST(SimEngine, TiedLeafAddsInPlaceOn2x) {
  int64_t grad = 0;
  // The seed, the buffer and the second gradient; no sum.
  EXPECT_EQ(backward_peak(/*in_place=*/true, /*grad_exists=*/false, &grad), 4 + 2000);
  EXPECT_EQ(grad, 1000);
}

TEST(SimEngine, AccumulationShadowMovesWhenTheLeafsNodeRunsNotAtItsFirstContribution) {
  // The first micro-batch's timeline plus the gradients not yet formed: the leaf's share
  // leaves the shadow only once both contributions are in, as in the real engine.
  sim::Sim s(1);
  const int64_t n = 1000;
  sim::Tensor w = s.empty(n / 4, 4);
  sim::Leaf* leaf = s.new_leaf(4, true);
  w.edge = sim::Edge{nullptr, 0, leaf};
  s.timeline.shadow(true, n);
  s.on_first_grad = [&s](int64_t bytes) { s.timeline.shadow_add(-bytes); };
  sim::Tensor a, b;
  for (sim::Tensor* out : {&a, &b}) {
    *out = s.empty(1, 4);
    s.record("use", {&w}, {out}, {}, [&s, n](sim::Grads&) { return sim::Grads{s.empty(n / 4, 4)}; });
  }
  sim::Tensor loss = s.empty(1, 4);
  s.record("add", {&a, &b}, {&loss}, {}, [](sim::Grads& g) { return sim::Grads{g[0], g[0]}; });
  const int64_t before = s.timeline.current();
  s.timeline.begin("backward");
  s.backward(loss, s.empty(1, 4));
  s.timeline.end();
  // A later micro-batch: .grad (1000, in the shadow) + buffer + second + sum.
  EXPECT_EQ(s.timeline.phase_peaks().at("backward") - before, 4000);
}

TEST(FitDecision, SearchesEveryPointAndNamesTheTrueSmallest) {
  // Not monotonic: micro-batch 5 without checkpointing needs less than micro-batch 1 with it.
  std::vector<est::FitPoint> pts = {
      {0, 10, false, 300}, {0, 5, false, 200}, {0, 2, false, 150}, {0, 1, false, 140},
      {1, 10, false, 250}, {1, 5, false, 116}, {1, 2, false, 120}, {1, 1, false, 118},
      {2, 10, true, 130},  {2, 5, true, 125},  {2, 2, true, 119},  {2, 1, true, 117},
  };
  bool fits = false;
  // 116..116.9: only level 1 at micro-batch 5 fits (a binary search over micro-batches
  // would have stopped at micro-batch 1's 118 and missed it).
  EXPECT_EQ(est::choose_point(pts, 116, &fits), 5);
  EXPECT_TRUE(fits);
  // Nothing fits: the point that needs least, whatever its level or micro-batch.
  EXPECT_EQ(est::choose_point(pts, 115, &fits), 5);
  EXPECT_FALSE(fits);
  // Room for checkpointing's micro-batch 10 (130): passed over for level 1's micro-batch 5,
  // the largest without recomputation.
  EXPECT_EQ(est::choose_point(pts, 150, &fits), 5);
  EXPECT_TRUE(fits);
  // Level 0's micro-batch 10 and level 1's tie at 10: the cheaper level.
  pts[4].peak_bytes = 300;
  EXPECT_EQ(est::choose_point(pts, 300, &fits), 0);
  // Ties on micro-batch go to the cheaper level.
  EXPECT_EQ(est::choose_point(pts, 1000, &fits), 0);
  // Points beyond any device (0) are never chosen.
  std::vector<est::FitPoint> none = {{0, 4, false, 0}};
  EXPECT_EQ(est::choose_point(none, 1000, &fits), -1);
  EXPECT_FALSE(fits);
}

}  // namespace

// The CUDA caching allocator model (sim.h), against PyTorch's rules.
namespace {
constexpr int64_t MiB = int64_t{1} << 20;

TEST(CachingAllocatorModel, PoolsAndSegmentSizes) {
  sim::CachingAllocatorModel m;
  // Small requests (<= 1 MiB) share 2 MiB segments, each rounded up to 512 B.
  const int64_t a = m.alloc(100), b = m.alloc(512 * 1024), c = m.alloc(MiB);
  EXPECT_EQ(m.reserved(), 2 * MiB);  // 512 B + 512 KiB + 1 MiB fit one segment
  const int64_t c2 = m.alloc(MiB);
  EXPECT_EQ(m.reserved(), 4 * MiB);  // the first has under 1 MiB left
  // 1 MiB < request < 10 MiB: a 20 MiB segment, whose rest serves later requests.
  const int64_t d = m.alloc(MiB + 1);
  EXPECT_EQ(m.reserved(), 24 * MiB);
  const int64_t e = m.alloc(11 * MiB);
  EXPECT_EQ(m.reserved(), 24 * MiB);
  // A request of 10 MiB or more that fits nowhere: its own segment, rounded to 2 MiB.
  const int64_t f = m.alloc(21 * MiB + 5);
  EXPECT_EQ(m.reserved(), 46 * MiB);
  for (int64_t id : {a, b, c, c2, d, e, f}) m.free(id);
  EXPECT_EQ(m.reserved(), 46 * MiB);  // segments are kept
  EXPECT_EQ(m.alloc(0), -1);
}

TEST(CachingAllocatorModel, BestFitSplitsAndMerges) {
  sim::CachingAllocatorModel m;
  const int64_t big = m.alloc(40 * MiB);  // its own 40 MiB segment
  m.free(big);
  const int64_t x = m.alloc(15 * MiB), y = m.alloc(15 * MiB);  // both split from it
  EXPECT_EQ(m.reserved(), 40 * MiB);
  m.free(x);
  m.free(y);  // merges with x and the rest: one 40 MiB block again
  const int64_t z = m.alloc(39 * MiB);
  EXPECT_EQ(m.reserved(), 40 * MiB);
  // A large block's rest of at most 1 MiB is not split off: a 1 MiB request now needs a
  // segment of its own (the small pool's).
  const int64_t w = m.alloc(MiB);
  EXPECT_EQ(m.reserved(), 42 * MiB);
  m.free(z);
  m.free(w);
}

TEST(CachingAllocatorModel, FragmentationReservesMoreThanLive) {
  sim::CachingAllocatorModel m;
  // Interleaved 12 MiB and 14 MiB blocks, every second one freed: the holes are too small
  // for a 16 MiB request, which takes a new segment.
  std::vector<int64_t> ids;
  for (int i = 0; i < 6; ++i) ids.push_back(m.alloc((i % 2 ? 14 : 12) * MiB));
  for (int i = 0; i < 6; i += 2) m.free(ids[i]);
  const int64_t before = m.reserved();
  m.alloc(16 * MiB);
  EXPECT_EQ(m.reserved(), before + 16 * MiB);
}

TEST(DeviceModel, MeasuredGpuConstants) {
  const est::DeviceModel h200 = est::DeviceModel::cuda("NVIDIA H200");
  EXPECT_EQ(h200.context_bytes, 800 * MiB);
  EXPECT_DOUBLE_EQ(h200.reserved_overhead, 0.05);
  EXPECT_EQ(h200.workspace_bytes, 64 * MiB);
  const est::DeviceModel other = est::DeviceModel::cuda("Some Future GPU");
  EXPECT_EQ(other.context_bytes, est::DeviceModel::kCudaContextBytes);
  EXPECT_DOUBLE_EQ(other.reserved_overhead, est::DeviceModel::kCudaReservedOverhead);
}
}  // namespace
