// memfitd's configuration: a YAML file plus flags (flags win), with embedded defaults
// that run out of the box on a machine without GPUs.
//
//   listen: 127.0.0.1:7540            # gRPC
//   metrics_listen: 127.0.0.1:9540    # Prometheus /metrics ("" = off)
//   state_dir: /var/lib/memfit        # SQLite database, job folders
//   worker: /usr/lib/memfit/memfit-worker
//   gpus: auto                        # auto | off: NVML through dlopen
//   cpu_devices: 2                    # when no GPU is found (or gpus: off)
//   cpu_device_memory: 8GiB
//   devices: [{name: cpu:0, memory: 4GiB}]   # explicit devices instead of the two above
//   tokens_file: /etc/memfit/tokens   # "TOKEN USER [admin]" per line; absent = no auth
//   tls: {cert: server.pem, key: server.key}
//   paths:                            # where a job's files may be ({user}: the caller)
//     read_roots: [/models, "/data/{user}"]      # inputs must lie below one of these
//     write_roots: ["/data/{user}/runs"]         # output_dir may lie below one of these
//   allowed_roots: [/data]            # older form: a root for both reading and writing
//   limits: {max_queued_per_user: 1000, max_message_bytes: 4MiB, max_input_bytes: 4GiB,
//            max_weights_bytes: 1TiB, max_name_bytes: 256, max_user_priority: 10}
//   workers: {user: memfit-worker, memory_allowance: 2GiB, cgroup: /sys/fs/cgroup/memfit}
//   scheduling: {margin: 0.08, oom_retries: 2, crash_retries: 2, oom_growth: 1.25,
//                starvation_minutes: 30, cancel_grace_seconds: 60, paused: false,
//                placement: spread}    # or best_fit (scheduler.h)
//   metrics: {finished_retention_seconds: 600, finished_max_jobs: 1000}
//   executor: local                   # local (worker processes here) | slurm (docs/SLURM.md)
//   slurm: {partition: gpu-shared, shard_memory: 10GiB, shards_per_gpu: 8, gpus: 16,
//           device: cuda, run_as: service, bin_dir: "", sbatch_args: [], poll_seconds: 2,
//           parallel_submissions: 4}
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace memfit::daemon {

class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct DeviceConfig {
  std::string name;  // "cpu:0" or "cuda:0"
  int64_t memory_bytes = 0;
};

// The Slurm executor (executor: slurm): each admitted job is one sbatch job asking for
// ceil(reservation / shard_memory) shards of one GPU on `partition`, which must hold shard
// jobs only (Slurm 22.05 does not keep whole-GPU and shard jobs apart on one GPU).
struct SlurmConfig {
  std::string partition;             // required
  int64_t shard_memory = 0;          // bytes per shard, as gres.conf's Count divides a GPU (required)
  int shards_per_gpu = 0;            // required: a job asks for at most this many (more never start)
  int gpus = 0;                      // GPUs of the partition (memfitd's queue stops at their total)
  std::string device = "cuda";       // what the worker runs on: cuda | cpu (test clusters)
  std::string run_as = "service";    // service: workers.user (or memfitd's user) | submitter: the job's owner
  std::string bin_dir;               // folder of sbatch, squeue, scancel, sacct ("" = PATH)
  std::vector<std::string> sbatch_args;  // extra arguments (an account, a QoS), after memfitd's
  double poll_seconds = 2;           // squeue at most this often
  int parallel_submissions = 4;      // sbatch runs at once when one pass places several jobs
  bool given = false;                // the file has a slurm: section (refused without executor: slurm)
};

struct Config {
  std::string listen = "127.0.0.1:7540";
  std::string metrics_listen = "127.0.0.1:9540";
  std::string state_dir;          // default: $MEMFIT_STATE_DIR or ~/.local/state/memfit
  std::string worker;             // default: memfit-worker next to memfitd
  bool gpus = true;               // look for GPUs through NVML
  int cpu_devices = 2;
  int64_t cpu_device_memory = int64_t{8} << 30;
  std::vector<DeviceConfig> devices;  // explicit devices (replace the CPU defaults)
  int worker_threads = 0;         // CPU workers: 0 = cores / CPU devices
  std::string tokens_file;
  std::string tls_cert, tls_key;
  // Inputs must lie beneath a read root, an output_dir beneath a write root ({user} is
  // replaced by the caller's name). With none, nothing outside the state dir is read and
  // jobs write only into their own folder in the state dir.
  std::vector<std::string> read_roots, write_roots;
  int64_t max_queued_per_user = 1000;
  int64_t max_message_bytes = int64_t{4} << 20;
  int64_t max_input_bytes = int64_t{4} << 30;      // data, tokenizer, config files
  int64_t max_weights_bytes = int64_t{1} << 40;    // a weights file
  int64_t max_name_bytes = 256;
  int max_user_priority = 10;                      // higher needs an admin token
  // Workers: run as this user when memfitd is root; a kernel-enforced memory limit of the
  // reservation plus this allowance (code, libraries, data); a cgroup v2 folder delegated
  // to memfitd (memory.max per worker) instead of RLIMIT_DATA.
  std::string worker_user;
  int64_t worker_uid = -1, worker_gid = -1;
  int64_t worker_memory_allowance = int64_t{2} << 30;
  std::string worker_cgroup;
  double margin = 0.08;
  int oom_retries = 2;
  int crash_retries = 2;
  double oom_growth = 1.25;
  double starvation_minutes = 30;
  std::string placement = "spread";  // spread | best_fit (sched::PlacementPolicy)
  double cancel_grace_seconds = 60;
  bool paused = false;            // accept and queue jobs but start no worker (load tests)
  // /metrics keeps a finished job's series (with its final state) this long, so a job
  // shorter than the scrape interval is still seen; at most this many finished jobs.
  double metrics_finished_retention_seconds = 600;
  int64_t metrics_finished_max_jobs = 1000;
  std::string executor = "local";  // local | slurm
  bool executor_given = false;     // the file names one (a slurm section without it is refused)
  SlurmConfig slurm;
};

// Defaults, then the YAML file (if given), then the flags. Throws ConfigError naming the
// key or flag. `argv0` locates memfit-worker next to the daemon.
Config load_config(const std::vector<std::string>& args, const std::string& argv0);
std::string usage();
// The effective configuration as YAML (`memfitd --check-config`).
std::string describe(const Config& c);

}  // namespace memfit::daemon
