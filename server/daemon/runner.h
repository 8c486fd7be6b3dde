// Worker processes: start memfit-worker detached (its own session, stdout and stderr to
// files in the job's folder, so it outlives a daemon killed with SIGKILL), read its JSON
// event lines from the stdout file as they come, signal it, and notice when it is gone.
// A worker started by an earlier daemon is adopted by pid and file offset.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace memfit::daemon {

struct WorkerLaunch {
  std::string binary;                 // memfit-worker
  std::vector<std::string> args;      // after the binary
  std::vector<std::string> env;       // extra NAME=VALUE
  std::string dir;                    // the job's folder: worker.out, worker.err
};

class WorkerProcess {
 public:
  // Throws std::runtime_error if the process cannot be started.
  static WorkerProcess start(const WorkerLaunch& l);
  // A worker of an earlier daemon: tail `out_path` from `offset`. nullopt when `pid` is
  // not a live memfit-worker.
  static std::optional<WorkerProcess> adopt(int64_t pid, const std::string& out_path, int64_t offset);
  // A worker that ended while no daemon watched it: its remaining lines, then exited().
  static WorkerProcess gone(const std::string& out_path, int64_t offset);

  int64_t pid() const { return pid_; }
  const std::string& out_path() const { return out_path_; }
  int64_t offset() const { return offset_; }
  // Complete lines written since the last call (the offset advances past them).
  std::vector<std::string> read_lines();
  // Whether the process is gone; then exit_code() is set for our own children (-1 for
  // adopted ones and for signals).
  bool exited();
  int exit_code() const { return exit_code_; }
  bool own_child() const { return child_; }
  void terminate();  // SIGTERM to the worker
  void kill();       // SIGKILL

 private:
  int64_t pid_ = 0;
  std::string out_path_;
  int64_t offset_ = 0;
  bool child_ = true;
  bool gone_ = false;
  int exit_code_ = -1;
  std::string partial_;
};

}  // namespace memfit::daemon
