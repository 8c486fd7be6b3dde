// memfit-bench-gemm: fp32 matrix-multiply throughput of the BLAS that LibTorch loads,
// used to choose the BLAS the setup installs (docs/PERFORMANCE.md). Swap BLAS without
// touching the system with LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/<blas-dir>.
//
//   memfit-bench-gemm [--threads N]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

int main(int argc, char** argv) {
  int threads = 2;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--threads") == 0 && i + 1 < argc) {
      threads = std::atoi(argv[++i]);
    } else {
      std::fprintf(stderr, "usage: %s [--threads N]\n", argv[0]);
      return 2;
    }
  }
  if (threads < 1) {
    std::fprintf(stderr, "%s: --threads must be >= 1\n", argv[0]);
    return 2;
  }
  at::set_num_threads(threads);
  at::manual_seed(0);
  std::printf("{\"threads\": %d, \"gemm\": [", threads);
  bool first = true;
  for (int64_t n : {512, 1024, 2048}) {
    const at::Tensor a = at::randn({n, n}), b = at::randn({n, n});
    for (int i = 0; i < 2; ++i) at::mm(a, b);
    std::vector<double> s;
    at::Tensor c;
    for (int i = 0; i < 7; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      c = at::mm(a, b);
      s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(s.begin(), s.end());
    const double err = (c.to(at::kDouble) - at::mm(a.to(at::kDouble), b.to(at::kDouble))).abs().max().item<double>();
    std::printf("%s{\"n\": %lld, \"gflops\": %.1f, \"max_abs_err\": %.2e}", first ? "" : ", ",
                static_cast<long long>(n), 2.0 * n * n * n / s[3] / 1e9, err);
    first = false;
  }
  std::printf("]}\n");
  return 0;
}
