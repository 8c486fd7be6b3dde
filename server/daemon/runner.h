// Worker processes: start memfit-worker detached (its own session, stdout and stderr to
// files in the job's folder, so it outlives a daemon killed with SIGKILL), confined (a
// kernel-enforced memory limit, an unprivileged user where the daemon is root, no file
// descriptor of the daemon's), read its JSON event lines from the stdout file as they come,
// signal it, and notice when it is gone. A worker started by an earlier daemon is adopted
// by pid and file offset.
//
// The core talks to workers through the WorkerLauncher and Worker interfaces only, so the
// state-machine tests (tests/daemon/) drive it with a fake launcher and no processes.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <map>
#include <memory>
#include <set>
#include <optional>
#include <string>
#include <vector>

namespace memfit::daemon {

// How a worker is confined. Zero/empty fields mean "not applied".
struct Confinement {
  int64_t memory_limit_bytes = 0;  // RLIMIT_DATA (heap and private mappings), or memory.max below
  std::string cgroup_dir;          // a delegated cgroup v2 folder: the worker gets its own child
                                   // cgroup with memory.max = memory_limit_bytes (+ swap.max 0)
  int64_t uid = -1, gid = -1;      // run as this user (the daemon must be root)
};

struct WorkerLaunch {
  std::string binary;                 // memfit-worker
  int64_t reservation_bytes = 0;      // the job's reservation (the Slurm executor's shard count)
  std::vector<std::string> args;      // after the binary
  std::vector<std::string> env;       // extra NAME=VALUE
  std::string dir;                    // the job's folder: worker.out, worker.err
  std::string job_id;                 // names the worker's cgroup
  Confinement confine;
};

// The complete lines appended to a file since `offset` (a worker's stdout): each read()
// returns the lines finished since the last one and advances offset() past them. At most
// 16 MiB per call; an unterminated line over 1 MiB is dropped. Links are not followed.
class LineTail {
 public:
  static constexpr size_t kMaxLines = 10000;  // handed out per read(); the rest stays for the next
  LineTail(std::string path, int64_t offset) : path_(std::move(path)), offset_(offset) {}
  // Complete lines that begin with '{' after any blanks or BOM (the only ones that can be
  // events), at most
  // kMaxLines; `offset()` advances past what was handed out or dropped.
  std::vector<std::string> read();
  const std::string& path() const { return path_; }
  int64_t offset() const { return offset_; }

 private:
  std::string path_;
  int64_t offset_ = 0;
  std::string partial_;
};

class Worker {
 public:
  virtual ~Worker() = default;
  virtual int64_t pid() const = 0;
  virtual const std::string& out_path() const = 0;
  virtual int64_t offset() const = 0;
  // Complete lines written since the last call (the offset advances past them).
  virtual std::vector<std::string> read_lines() = 0;
  // Whether the process is gone; then exit_code() or exit_signal() are set for our own
  // children (-1 and 0 for adopted ones).
  virtual bool exited() = 0;
  virtual int exit_code() const = 0;
  virtual int exit_signal() const = 0;
  virtual void terminate() = 0;  // SIGTERM: checkpoint and stop
  virtual void kill() = 0;       // SIGKILL
  // How the executor holds it now, once per change, for the job's events ("" = no change):
  // a Slurm job waiting for resources, then running on a node. Local processes: never.
  virtual std::string status_change() { return ""; }
};

class WorkerLauncher {
 public:
  virtual ~WorkerLauncher() = default;
  // Throws std::runtime_error naming the cause if the process cannot be started. Called
  // from one thread at a time under the core's lock, except the Slurm executor's: several
  // at once, without it (slurm.parallel_submissions).
  virtual std::unique_ptr<Worker> start(const WorkerLaunch& l) = 0;
  // A worker of an earlier daemon: nullptr when `pid` is not a live memfit-worker.
  virtual std::unique_ptr<Worker> adopt(int64_t pid, const std::string& out_path, int64_t offset) = 0;
  // A worker that ended while no daemon watched it: its remaining lines, then exited().
  virtual std::unique_ptr<Worker> gone(const std::string& out_path, int64_t offset) = 0;
  // After a restart, for the jobs that are queued: stop any run of them the executor still
  // has (a submission made just before memfitd died, never recorded). Returns, per job id,
  // what it stopped. Local processes: nothing to find.
  virtual std::map<std::string, std::string> withdraw(const std::set<std::string>& /*job_ids*/) { return {}; }
};

// Real processes (fork + exec, confined as the launch says).
// The worker's environment: memfitd's own, with each NAME=VALUE of `extra` replacing any
// inherited NAME (an inherited CUDA_VISIBLE_DEVICES must not win over the placement, and
// getenv returns the first of two).
std::vector<std::string> merge_env(const std::vector<std::string>& base, const std::vector<std::string>& extra);

class ProcessLauncher : public WorkerLauncher {
 public:
  std::unique_ptr<Worker> start(const WorkerLaunch& l) override;
  std::unique_ptr<Worker> adopt(int64_t pid, const std::string& out_path, int64_t offset) override;
  std::unique_ptr<Worker> gone(const std::string& out_path, int64_t offset) override;
};

// Whether `dir` is a cgroup v2 folder this process may create children in with the memory
// controller enabled for them. `why` gets the reason when not.
bool CgroupUsable(const std::string& dir, std::string* why);

}  // namespace memfit::daemon
