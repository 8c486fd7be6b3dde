// GoogleTest main for the ops suites: installs the memory meter before any tensor is
// allocated and runs ATen on 2 threads, as the benchmarks do.
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include "memory_meter.h"

int main(int argc, char** argv) {
  memfit::ops::MemoryMeter::install();
  at::set_num_threads(2);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
