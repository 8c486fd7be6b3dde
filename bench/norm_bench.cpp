// memfit-bench-norm: forward time of MS-LayerNorm / MS-RMSNorm next to ATen's
// layer_norm, fp32 on CPU, median of --reps calls after 3 warm-up calls. With
// --threads 1 it reads the calling thread's CPU time, so time spent descheduled by
// other processes on a shared machine is not counted; with more threads, wall time.
//
//   memfit-bench-norm [--rows 8192] [--cols 768] [--reps 41] [--threads 1]
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <vector>

#include "ops.h"

namespace {

double now_ms(bool thread_cpu) {
  timespec t{};
  clock_gettime(thread_cpu ? CLOCK_THREAD_CPUTIME_ID : CLOCK_MONOTONIC, &t);
  return static_cast<double>(t.tv_sec) * 1e3 + static_cast<double>(t.tv_nsec) * 1e-6;
}

double median_ms(const std::function<at::Tensor()>& fn, int reps, bool thread_cpu) {
  std::vector<double> ms;
  for (int r = -3; r < reps; ++r) {
    const double t0 = now_ms(thread_cpu);
    const at::Tensor y = fn();
    const double t1 = now_ms(thread_cpu);
    if (r >= 0) ms.push_back(t1 - t0);
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  int64_t rows = 8192, cols = 768;
  int reps = 41, threads = 1;
  for (int i = 1; i + 1 < argc; i += 2) {
    const long long v = std::atoll(argv[i + 1]);
    if (v < 1) {
      std::fprintf(stderr, "%s needs a positive integer\n", argv[i]);
      return 2;
    }
    if (!std::strcmp(argv[i], "--rows")) rows = v;
    else if (!std::strcmp(argv[i], "--cols")) cols = v;
    else if (!std::strcmp(argv[i], "--reps")) reps = static_cast<int>(v);
    else if (!std::strcmp(argv[i], "--threads")) threads = static_cast<int>(v);
    else {
      std::fprintf(stderr, "usage: %s [--rows N] [--cols N] [--reps N] [--threads N]\n", argv[0]);
      return 2;
    }
  }
  at::set_num_threads(threads);
  at::manual_seed(1);
  const at::Tensor x = at::randn({rows, cols});
  const bool thread_cpu = threads == 1;
  at::NoGradGuard no_grad;
  const double ln = median_ms([&] { return memfit::ops::ms_layer_norm(x, 1e-5); }, reps, thread_cpu);
  const double rms = median_ms([&] { return memfit::ops::ms_rms_norm(x, 1e-6); }, reps, thread_cpu);
  const double stock = median_ms([&] { return at::layer_norm(x, {cols}); }, reps, thread_cpu);
  std::printf("[%lld, %lld] fp32 forward, %d thread(s), median of %d (%s): ms_layer_norm %.3f ms, "
              "ms_rms_norm %.3f ms, at::layer_norm %.3f ms\n",
              static_cast<long long>(rows), static_cast<long long>(cols), threads, reps,
              thread_cpu ? "thread CPU time" : "wall time", ln, rms, stock);
  return 0;
}
