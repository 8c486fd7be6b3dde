#include "memory_meter.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#if MEMFIT_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

namespace memfit::ops {
namespace {

// Each block carries a 64-byte header holding its size, so the context pointer equals
// the data pointer's block and no side table is needed; 64 bytes keep the data as
// aligned as c10's own CPU allocator does.
constexpr size_t kHeader = 64;

std::atomic<int64_t> g_current{0};
std::atomic<int64_t> g_peak{0};
std::atomic<int64_t> g_limit{0};
std::atomic<int64_t> g_allocs{0};
std::atomic<bool> g_installed{false};

// MEMFIT_ALLOC_TRACE=1: every allocation and free on stderr ("+bytes now" / "-bytes now"),
// to diff against `memfit estimate` under MEMFIT_ESTIMATE_TRACE=1 when an estimate misses.
const bool g_trace = [] {
  const char* v = std::getenv("MEMFIT_ALLOC_TRACE");
  return v != nullptr && *v != '\0' && *v != '0';
}();

void note_alloc(int64_t n) {
  const int64_t now = g_current.fetch_add(n, std::memory_order_relaxed) + n;
  if (g_trace) std::fprintf(stderr, "+%lld %lld\n", static_cast<long long>(n), static_cast<long long>(now));
  int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (now > peak && !g_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
  g_allocs.fetch_add(1, std::memory_order_relaxed);
}

void tracked_free(void* block) {
  if (block == nullptr) return;
  int64_t n;
  std::memcpy(&n, block, sizeof n);
  const int64_t now = g_current.fetch_sub(n, std::memory_order_relaxed) - n;
  if (g_trace) std::fprintf(stderr, "-%lld %lld\n", static_cast<long long>(n), static_cast<long long>(now));
  c10::free_cpu(block);
}

void delete_data(void* data) {
  if (data != nullptr) tracked_free(static_cast<char*>(data) - kHeader);
}

// c10::Allocator::allocate lost its const in LibTorch 2.3 (docs/GPU.md lists such changes).
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 3)
#define MEMFIT_ALLOCATE_CONST
#else
#define MEMFIT_ALLOCATE_CONST const
#endif

struct TrackingAllocator final : public c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) MEMFIT_ALLOCATE_CONST override {
    if (nbytes == 0) return {nullptr, nullptr, &delete_data, c10::Device(c10::kCPU)};
    const int64_t n = static_cast<int64_t>(nbytes);
    const int64_t limit = g_limit.load(std::memory_order_relaxed);
    if (limit > 0) {
      const int64_t now = g_current.load(std::memory_order_relaxed);
      TORCH_CHECK_WITH(OutOfMemoryError, now + n <= limit,
                       "memfit: CPU out of memory: tried to allocate ", n, " bytes with ", now,
                       " of the ", limit, "-byte limit in use");
    }
    char* block = static_cast<char*>(c10::alloc_cpu(nbytes + kHeader));
    std::memcpy(block, &n, sizeof n);
    note_alloc(n);
    void* data = block + kHeader;
    return {data, data, &delete_data, c10::Device(c10::kCPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &delete_data; }
  // Pure virtual in LibTorch 2.x; an extra method in 1.13.
  void copy_data(void* dest, const void* src, std::size_t count) const {
    std::memcpy(dest, src, count);
  }
};

TrackingAllocator g_allocator;
std::mutex g_install_mutex;

}  // namespace

void MemoryMeter::install() {
  std::lock_guard<std::mutex> lock(g_install_mutex);
  if (g_installed.load()) return;
  // Priority above c10's default (0) and the mobile allocator's.
  c10::SetCPUAllocator(&g_allocator, /*priority=*/100);
  g_installed.store(true);
}

bool MemoryMeter::installed() { return g_installed.load(); }

MemoryStats MemoryMeter::stats(c10::Device device) {
  MemoryStats s;
  if (device.is_cpu()) {
    s.current_bytes = g_current.load();
    s.peak_bytes = g_peak.load();
    s.reserved_bytes = s.current_bytes;
    s.peak_reserved_bytes = s.peak_bytes;
    s.limit_bytes = g_limit.load();
    s.allocations = g_allocs.load();
    return s;
  }
#if MEMFIT_WITH_CUDA
  if (device.is_cuda()) {
    const auto d = c10::cuda::CUDACachingAllocator::getDeviceStats(device.index() < 0 ? 0 : device.index());
    // Index 0 is StatType::AGGREGATE; the enum moved namespaces across LibTorch 2.x
    // releases, the index did not.
    const size_t agg = 0;
    s.current_bytes = d.allocated_bytes[agg].current;
    s.peak_bytes = d.allocated_bytes[agg].peak;
    s.reserved_bytes = d.reserved_bytes[agg].current;
    s.peak_reserved_bytes = d.reserved_bytes[agg].peak;
    s.allocations = d.allocation[agg].allocated;
    return s;
  }
#endif
  TORCH_CHECK(false, "memfit::ops::MemoryMeter: no memory statistics for device ", device);
  return s;
}

void MemoryMeter::reset_peak(c10::Device device) {
  if (device.is_cpu()) {
    g_peak.store(g_current.load());
    return;
  }
#if MEMFIT_WITH_CUDA
  if (device.is_cuda()) {
    c10::cuda::CUDACachingAllocator::resetPeakStats(device.index() < 0 ? 0 : device.index());
    return;
  }
#endif
  TORCH_CHECK(false, "memfit::ops::MemoryMeter: no memory statistics for device ", device);
}

void MemoryMeter::set_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "memfit::ops::MemoryMeter::set_limit: bytes must be >= 0, got ", bytes);
  g_limit.store(bytes);
}

}  // namespace memfit::ops
