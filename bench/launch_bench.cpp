// The cost of confining a job at its start (docs/PERFORMANCE.md, "Confinement"): what
// memfitd does per placement beyond starting the process, timed in one run side by side.
//   - start: fork + exec of a short program through ProcessLauncher, plain vs confined
//     (RLIMIT_DATA, every inherited descriptor closed, a cgroup where one is given), until
//     the process has exited;
//   - claim: creating a job's output folder beneath its root without following links, its
//     marker with O_EXCL (ClaimOutput), against a plain mkdir + file;
//   - inputs: opening an input beneath its root with openat2, against a plain open.
//
// With --slurm-burst N, instead: one scheduling pass of memfitd's core placing N queued
// jobs on the Slurm executor, whose sbatch (a script here) takes --sbatch-seconds to
// answer, as a slow controller would: the pass with slurm.parallel_submissions 1 (one
// sbatch after another) against 4 and 8, alternately, medians of --reps passes.
//
//   memfit-bench-launch [--reps N] [--program /bin/true]
//   memfit-bench-launch --slurm-burst 16 [--sbatch-seconds 0.25] [--reps 3]
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
#include "core.h"
#include "devices.h"
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

// Seconds for one tick that places `jobs` queued jobs through the Slurm executor, sbatch
// answering after `delay` seconds, `parallel` sbatch at once.
double slurm_pass(const std::string& dir, int jobs, int parallel) {
  namespace d = memfit::daemon;
  const std::string state = dir + "/state-" + std::to_string(parallel);
  fs::remove_all(state);
  d::Config cfg;
  cfg.state_dir = state;
  cfg.read_roots = {dir + "/in"};
  cfg.write_roots = {dir + "/out"};
  cfg.worker = dir + "/memfit-worker";
  cfg.gpus = false;
  cfg.executor = "slurm";
  cfg.slurm.partition = "bench";
  cfg.slurm.shard_memory = int64_t{1} << 30;
  cfg.slurm.shards_per_gpu = 8;
  cfg.slurm.gpus = 64;
  cfg.slurm.device = "cpu";
  cfg.slurm.bin_dir = dir + "/bin";
  cfg.slurm.parallel_submissions = parallel;
  cfg.max_queued_per_user = std::max(cfg.max_queued_per_user, static_cast<int64_t>(jobs));
  std::string log;
  auto devices = d::DeviceMonitor::create(cfg, &log);
  auto store = memfit::store::Store::open(state);
  double seconds = 0;
  {
    d::Core core(cfg, *store, *devices);
    core.start(/*run_loop=*/false);
    memfit::v1::SubmitJobRequest r;
    memfit::v1::JobSpec& s = *r.mutable_spec();
    s.set_name("burst");
    s.mutable_model()->set_architecture("gpt2");
    s.mutable_model()->set_config_path(dir + "/in/config.json");
    s.mutable_data()->set_train_path(dir + "/in/train.txt");
    s.mutable_data()->set_format("text");
    s.mutable_data()->set_tokenizer_path(dir + "/in/tok");
    s.mutable_method()->set_kind("lora");
    s.mutable_training()->set_steps(10);
    s.mutable_training()->set_micro_batch(2);
    s.mutable_training()->set_sequence_length(16);
    for (int i = 0; i < jobs; ++i) core.submit(d::Caller{}, r);
    const auto t0 = Clock::now();
    core.tick();
    seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    const auto list = core.list(d::Caller{}, memfit::v1::ListJobsRequest{});
    int running = 0;
    for (const auto& j : list.jobs()) running += j.state() == memfit::v1::RUNNING;
    if (running != jobs) {
      std::fprintf(stderr, "memfit-bench-launch: %d of %d jobs running after the pass\n", running, jobs);
      std::exit(1);
    }
    core.stop(/*graceful=*/false);
  }
  return seconds;
}

int slurm_burst(int jobs, double delay, int reps) {
  char tmpl[] = "/tmp/memfit-burst-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  fs::create_directories(dir + "/in/tok");
  fs::create_directories(dir + "/out");
  fs::create_directories(dir + "/bin");
  std::ofstream(dir + "/in/config.json")
      << R"({"model_type":"gpt2","vocab_size":1000,"n_embd":32,"n_layer":1,"n_head":2,"n_positions":64})";
  std::ofstream(dir + "/in/train.txt") << "some text";
  std::ofstream(dir + "/memfit-worker") << "";
  // A controller that answers each sbatch after `delay` s; squeue lists nothing, scancel
  // and sacct succeed.
  auto script = [&](const std::string& name, const std::string& body) {
    const std::string p = dir + "/bin/" + name;
    std::ofstream(p) << "#!/bin/sh\n" << body << "\n";
    fs::permissions(p, fs::perms::owner_all);
  };
  script("sbatch", "sleep " + std::to_string(delay) + "\necho $$");
  script("squeue", "echo '{\"jobs\": []}'");
  script("scancel", "exit 0");
  script("sacct", "exit 0");
  std::vector<double> t1, t4, t8;
  for (int i = 0; i < reps; ++i) {
    t1.push_back(slurm_pass(dir, jobs, 1));
    t4.push_back(slurm_pass(dir, jobs, 4));
    t8.push_back(slurm_pass(dir, jobs, 8));
  }
  std::printf("memfit-bench-launch: one pass placing %d jobs on the Slurm executor, sbatch answering after %.2f s, "
              "medians of %d\n",
              jobs, delay, reps);
  std::printf("parallel_submissions 1: %6.2f s   4: %6.2f s (%.2fx faster)   8: %6.2f s (%.2fx faster)\n", median(t1),
              median(t4), median(t1) / median(t4), median(t8), median(t1) / median(t8));
  fs::remove_all(dir);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  int reps = 200;
  int burst = 0;
  double sbatch_seconds = 0.25;
  std::string program = "/bin/true";
  bool reps_given = false;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (std::strcmp(argv[i], "--reps") == 0) reps = std::atoi(argv[i + 1]), reps_given = true;
    if (std::strcmp(argv[i], "--program") == 0) program = argv[i + 1];
    if (std::strcmp(argv[i], "--slurm-burst") == 0) burst = std::atoi(argv[i + 1]);
    if (std::strcmp(argv[i], "--sbatch-seconds") == 0) sbatch_seconds = std::atof(argv[i + 1]);
  }
  if (burst > 0) return slurm_burst(burst, sbatch_seconds, reps_given ? std::max(1, reps) : 3);
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
