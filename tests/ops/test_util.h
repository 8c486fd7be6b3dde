// Helpers for the ops tests: exact byte accounting with the memory meter, and
// comparisons that report the worst element.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "memory_meter.h"

namespace memfit::test {

inline int64_t current_bytes() { return memfit::ops::MemoryMeter::stats().current_bytes; }

// Bytes that `op`'s autograd graph keeps alive after forward, beyond its outputs: the
// op's input is a fresh non-leaf copy of `leaf` whose only other reference is dropped
// before measuring, so an op that keeps its input is charged for it.
inline int64_t kept_bytes(const at::Tensor& leaf,
                          const std::function<at::Tensor(const at::Tensor&)>& op) {
  const int64_t before = current_bytes();
  at::Tensor out;
  {
    at::Tensor x = leaf.clone();
    out = op(x);
  }
  const int64_t kept = current_bytes() - before - static_cast<int64_t>(out.nbytes());
  return kept;
}

// Max |a - b| / (atol + rtol * |b|) <= 1, with a message naming the worst element.
inline ::testing::AssertionResult close(const at::Tensor& a, const at::Tensor& b, double rtol,
                                        double atol) {
  if (a.sizes() != b.sizes()) {
    return ::testing::AssertionFailure() << "shapes differ: " << a.sizes() << " vs " << b.sizes();
  }
  if (a.numel() == 0) return ::testing::AssertionSuccess();
  const at::Tensor ad = a.to(at::kDouble), bd = b.to(at::kDouble);
  const at::Tensor ratio = (ad - bd).abs() / (atol + rtol * bd.abs());
  const at::Tensor nan_mismatch = ad.isnan().logical_xor(bd.isnan());
  if (nan_mismatch.any().item<bool>()) return ::testing::AssertionFailure() << "NaN positions differ";
  const at::Tensor r = ratio.masked_fill(ad.isnan(), 0.0).flatten();
  const int64_t worst = r.argmax().item<int64_t>();
  const double w = r[worst].item<double>();
  if (w <= 1.0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "worst element " << worst << ": " << ad.flatten()[worst].item<double>() << " vs "
         << bd.flatten()[worst].item<double>() << " (" << w << "x the tolerance)";
}

// Expects `fn` to throw a c10::Error whose message contains every one of `parts`.
inline void expect_error(const std::function<void()>& fn, std::initializer_list<std::string> parts) {
  try {
    fn();
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    for (const std::string& p : parts) {
      EXPECT_NE(msg.find(p), std::string::npos) << "message lacks '" << p << "': " << msg;
    }
    return;
  }
  ADD_FAILURE() << "expected a c10::Error";
}

}  // namespace memfit::test
