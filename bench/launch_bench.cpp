// The cost of confining a job at its start (docs/PERFORMANCE.md, "Confinement"): what
// memfitd does per placement beyond starting the process, timed in one run side by side.
//   - start: fork + exec of a short program through ProcessLauncher, plain vs confined
//     (RLIMIT_DATA, every inherited descriptor closed, a cgroup where one is given), until
//     the process has exited;
//   - claim: creating a job's output folder beneath its root without following links, its
//     marker with O_EXCL (ClaimOutput), against a plain mkdir + file;
//   - inputs: opening an input beneath its root with openat2, against a plain open.
//
//   memfit-bench-launch [--reps N] [--program /bin/true]
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "confined.h"
#include "paths.h"
#include "runner.h"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Runs a and b alternately `reps` times; microseconds per call, medians.
std::pair<double, double> ab(int reps, const std::function<void(int)>& a, const std::function<void(int)>& b) {
  std::vector<double> ta, tb;
  for (int i = 0; i < reps; ++i) {
    auto t0 = Clock::now();
    a(i);
    auto t1 = Clock::now();
    b(i);
    auto t2 = Clock::now();
    ta.push_back(std::chrono::duration<double, std::micro>(t1 - t0).count());
    tb.push_back(std::chrono::duration<double, std::micro>(t2 - t1).count());
  }
  return {median(ta), median(tb)};
}

void wait_exit(memfit::daemon::Worker& w) {
  while (!w.exited()) ::usleep(50);
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 200;
  std::string program = "/bin/true";
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--reps") == 0) reps = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--program") == 0) program = argv[i + 1];
  }
  char tmpl[] = "/tmp/memfit-launch-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  fs::create_directories(dir + "/jobs");
  fs::create_directories(dir + "/data");
  std::ofstream(dir + "/data/train.txt") << "text";
  // A daemon holds descriptors (database, sockets): open some so closing them counts.
  std::vector<int> held;
  for (int i = 0; i < 64; ++i) held.push_back(::open("/dev/null", O_RDONLY));

  memfit::daemon::ProcessLauncher launcher;
  memfit::daemon::WorkerLaunch plain;
  plain.binary = program;
  plain.dir = dir + "/jobs";
  plain.job_id = "bench";
  memfit::daemon::WorkerLaunch confined = plain;
  confined.confine.memory_limit_bytes = int64_t{2} << 30;
  const auto [t_plain, t_conf] = ab(
      reps, [&](int) { auto w = launcher.start(plain); wait_exit(*w); },
      [&](int) { auto w = launcher.start(confined); wait_exit(*w); });

  memfit::daemon::PathRules rules;
  rules.write_roots = {dir};
  rules.state_dir = dir + "/state";
  rules.jobs_dir = dir + "/state/jobs";
  const auto [t_claim, t_mkdir] = ab(
      reps,
      [&](int i) {
        const auto o = memfit::daemon::DecideOutput(rules, "u", "j", dir + "/out/c" + std::to_string(i));
        memfit::daemon::ClaimOutput(o, "j" + std::to_string(i), -1, -1);
      },
      [&](int i) {
        const std::string p = dir + "/out/m" + std::to_string(i);
        fs::create_directories(p);
        std::ofstream(p + "/.memfit-job") << "j\n";
      });

  const auto [t_open2, t_open] = ab(
      reps * 10,
      [&](int) { ::close(memfit::fsx::open_input(dir + "/data/train.txt", {dir})); },
      [&](int) { ::close(::open((dir + "/data/train.txt").c_str(), O_RDONLY | O_CLOEXEC)); });

  std::printf("memfit-bench-launch: %d reps (medians, microseconds)\n", reps);
  std::printf("start %s to exit:   plain %8.1f   confined %8.1f   ratio %.3f\n", program.c_str(), t_plain, t_conf,
              t_conf / t_plain);
  std::printf("output folder:      mkdir+file %8.1f   ClaimOutput %8.1f   ratio %.3f\n", t_mkdir, t_claim,
              t_claim / t_mkdir);
  std::printf("input open:         open %8.2f   beneath root %8.2f   ratio %.3f\n", t_open, t_open2, t_open2 / t_open);
  for (int fd : held) ::close(fd);
  fs::remove_all(dir);
  return 0;
}
