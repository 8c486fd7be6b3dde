// Memory meter: what a device has allocated now and at its peak.
//
// CPU: a tracking allocator installed with c10::SetCPUAllocator counts every tensor
// allocation (including what autograd keeps for backward; not oneDNN/BLAS scratch).
// An optional hard cap makes an allocation past it raise c10::OutOfMemoryError, so a
// CPU "device" behaves like a GPU with a fixed amount of memory.
// CUDA (MEMFIT_CUDA builds): the caching allocator's allocated and reserved bytes.
//
//   memfit::ops::MemoryMeter::install();          // once, early in main()
//   auto before = memfit::ops::MemoryMeter::stats(at::kCPU);
//   memfit::ops::MemoryMeter::reset_peak(at::kCPU);
//   ... forward + backward ...
//   int64_t peak = memfit::ops::MemoryMeter::stats(at::kCPU).peak_bytes - before.current_bytes;
//
// Thread-safe: counters are atomics; install() and set_limit() may be called any time.
#pragma once

#include <c10/core/Device.h>

#include <cstdint>

namespace memfit::ops {

struct MemoryStats {
  int64_t current_bytes = 0;   // bytes held by live tensors
  int64_t peak_bytes = 0;      // max of current_bytes since the last reset_peak
  int64_t reserved_bytes = 0;  // CUDA: held by the caching allocator; CPU: = current
  int64_t peak_reserved_bytes = 0;
  int64_t limit_bytes = 0;     // CPU hard cap, 0 = none
  int64_t allocations = 0;     // allocations since install (CPU)
};

class MemoryMeter {
 public:
  // Installs the CPU tracking allocator (idempotent). Tensors allocated before it was
  // installed are not counted (they free through their own allocator).
  static void install();
  static bool installed();
  static MemoryStats stats(c10::Device device = c10::Device(c10::kCPU));
  static void reset_peak(c10::Device device = c10::Device(c10::kCPU));
  // CPU only: allocations that would take current_bytes past `bytes` throw
  // c10::OutOfMemoryError; 0 removes the cap.
  static void set_limit(int64_t bytes);
};

}  // namespace memfit::ops
