// The memory meter: exact counts, peak reset, and the hard cap.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include "memory_meter.h"
#include "test_util.h"

namespace {

using memfit::ops::MemoryMeter;

TEST(MemoryMeter, CountsExactBytesOfEachAllocation) {
  ASSERT_TRUE(MemoryMeter::installed());
  const int64_t before = memfit::test::current_bytes();
  {
    const at::Tensor a = at::empty({1000}, at::kFloat);
    EXPECT_EQ(memfit::test::current_bytes() - before, 4000);
    const at::Tensor b = at::empty({3, 7}, at::kBFloat16);
    EXPECT_EQ(memfit::test::current_bytes() - before, 4000 + 42);
    const at::Tensor v = a.view({10, 100});  // a view allocates nothing
    EXPECT_EQ(memfit::test::current_bytes() - before, 4042);
  }
  EXPECT_EQ(memfit::test::current_bytes(), before);
}

TEST(MemoryMeter, PeakIsResettable) {
  const int64_t before = memfit::test::current_bytes();
  MemoryMeter::reset_peak();
  { const at::Tensor a = at::empty({1 << 20}, at::kByte); }
  EXPECT_GE(MemoryMeter::stats().peak_bytes - before, 1 << 20);
  MemoryMeter::reset_peak();
  EXPECT_EQ(MemoryMeter::stats().peak_bytes, memfit::test::current_bytes());
}

// Removes the cap however the test ends.
struct LimitGuard {
  ~LimitGuard() { MemoryMeter::set_limit(0); }
};

TEST(MemoryMeter, HardCapRaisesOutOfMemoryAndLosesNothing) {
  const LimitGuard guard;
  const at::Tensor w = at::randn({64, 64});
  const int64_t before = memfit::test::current_bytes();
  MemoryMeter::set_limit(before + (1 << 20));
  {
    const at::Tensor ok = at::empty({1 << 18}, at::kFloat);  // exactly 1 MiB: fits
    bool raised = false;
    try {
      const at::Tensor too_much = at::empty({1}, at::kFloat);
    } catch (const c10::OutOfMemoryError& e) {
      raised = true;
      EXPECT_NE(std::string(e.what()).find("out of memory"), std::string::npos);
    }
    EXPECT_TRUE(raised);
    EXPECT_EQ(memfit::test::current_bytes() - before, 1 << 20);
  }
  // A whole training step over the cap fails cleanly too.
  MemoryMeter::set_limit(before + 4096);
  EXPECT_THROW(at::mm(w, w), c10::OutOfMemoryError);
  MemoryMeter::set_limit(0);
  EXPECT_EQ(MemoryMeter::stats().limit_bytes, 0);
  EXPECT_EQ(at::mm(w, w).size(0), 64);
  EXPECT_THROW(MemoryMeter::set_limit(-1), c10::Error);
}

TEST(MemoryMeter, OtherDevicesAreRefusedInACpuBuild) {
#if !MEMFIT_WITH_CUDA
  EXPECT_THROW(MemoryMeter::stats(c10::Device(c10::kCUDA, 0)), c10::Error);
#endif
  EXPECT_THROW(MemoryMeter::stats(c10::Device(c10::kMeta)), c10::Error);
}

}  // namespace
