// The Slurm executor (executor: slurm): each worker attempt is one Slurm batch job.
// memfitd still admits, estimates, calibrates and queues every job as with local workers;
// instead of fork + exec it runs `sbatch`, asking for the job's reservation as shards of
// one GPU (--gres=shard:N, N = ceil(reservation / slurm.shard_memory)). Slurm chooses the
// node and the GPU and starts the job when the shards are free. The worker's JSON event
// lines reach memfitd through worker.out in the job's folder, which must be on a file
// system memfitd and the nodes share; squeue tells when a job ended, scancel stops it, and
// a restarted memfitd adopts a job by its Slurm id (stored in place of a pid).
//
// What Slurm 22.05 does with shards, measured (docs/SLURM.md): one job's shards always
// come from one GPU, and a job asking for more shards than one GPU has never starts, so N
// is capped at slurm.shards_per_gpu (admission refuses more: the partition device's
// max_job_bytes); whole-GPU jobs ignore shards in use, so the partition must hold shard
// jobs only.
//
// The pure parts (the request, the script, sbatch's arguments, reading squeue's JSON)
// are unit tested in tests/daemon/test_slurm.cpp; SlurmLauncher runs the commands
// through a CommandRunner that tests can replace, and tests/slurm/ runs memfitd against a
// real Slurm.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "config.h"
#include "runner.h"

namespace memfit::daemon {

// Shards for a reservation: ceil(bytes / shard_memory), at least 1 (may exceed
// shards_per_gpu; the caller refuses that).
int ShardsFor(int64_t reservation_bytes, const SlurmConfig& s);

// A word for POSIX sh: single-quoted, with ' written as '\''.
std::string ShellQuote(const std::string& word);

// The batch script: the launch's environment exported, then exec of the worker, every
// word quoted. The only input from users is in the arguments (paths beneath their roots),
// and quoting keeps each one a single word.
std::string SlurmBatchScript(const WorkerLaunch& l);

// sbatch's arguments (without "sbatch"): --parsable, the job name memfit-<job id>, the
// partition, --gres=shard:N, worker.out / worker.err in the launch folder (appended), the
// folder as working directory, no requeue by Slurm (memfitd decides retries), memfitd's
// environment not exported, --mem from the launch's host-memory limit, --uid/--gid when
// the launch runs as another user, then slurm.sbatch_args and the script.
std::vector<std::string> SbatchArgs(const WorkerLaunch& l, const SlurmConfig& s, const std::string& script_path);

// Why one item of slurm.sbatch_args cannot go into memfitd's sbatch command ("" when it
// can), for a worker running on `device` (cuda | cpu). memfitd puts the items, one
// argument each, after its own options and before the script, so each item must be one
// whole option of sbatch 22.05 (`--name=value` or `-Xvalue`; a bare word would become the
// batch script, a value in the next item would swallow it), read as sbatch's getopt_long
// reads it (unique prefixes such as --depend, bundles such as -vH; unknown and ambiguous
// names are refused, as sbatch would refuse them at every submission). None may replace
// what memfitd sets, change how many nodes or GPUs a job gets, delay or hold its start,
// make sbatch wait, print instead of submitting or hide the job id, or (cpu workers) set
// host memory, which memfitd sets from the reservation. Values that ask for what memfitd
// asks anyway pass (--nodes=1, --ntasks=1, --exclusive=user). Tested against glibc's own
// getopt_long in tests/daemon/test_slurm.cpp.
std::string SbatchArgProblem(const std::string& arg, const std::string& device);

struct SlurmJob {
  int64_t id = 0;
  std::string name;
  std::string state;   // PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, NODE_FAIL, ...
  std::string reason;  // why it is pending ("Resources", "Priority", ...)
  std::string nodes;
  int exit_code = -1;  // once final: the batch script's exit status (-1 unknown)
  int signal = 0;      // once final: the signal that ended it (0 none)
};

// squeue --json: Slurm 22.05 (job_state a string, exit_code the raw wait status) and later
// versions (job_state a list, exit_code an object). Throws std::runtime_error naming what
// is wrong for text that is not squeue's JSON.
std::map<int64_t, SlurmJob> ParseSqueueJson(const std::string& text);
// sacct -c -P -n -o JobID,State,ExitCode (the jobcomp file, no slurmdbd): "ID|FAILED|3:0".
std::map<int64_t, SlurmJob> ParseSacctLines(const std::string& text);
bool SlurmStateFinal(const std::string& state);

struct CommandResult {
  int status = -1;  // exit status; -1 when it could not run or was killed at the time limit
  std::string out, err;
};
using CommandRunner = std::function<CommandResult(const std::vector<std::string>& argv)>;
// fork + exec with memfitd's environment, stdout and stderr captured (at most 512 MiB each;
// more stdout is a failure, status -1),
// killed after `timeout_ms`.
CommandResult RunCommand(const std::vector<std::string>& argv, int timeout_ms);

class SlurmLauncher : public WorkerLauncher {
 public:
  // `run` executes Slurm's commands (RunCommand in memfitd); `clock_ms` paces squeue.
  // `background` (memfitd): squeue, sacct and scancel run in a thread of the launcher's,
  // never in the caller's (which holds memfitd's lock): a worker's exited() answers from
  // the last squeue at once. Without it (unit tests) they run in the caller's thread.
  SlurmLauncher(SlurmConfig cfg, CommandRunner run, std::function<int64_t()> clock_ms, bool background = false);
  ~SlurmLauncher() override;
  // Writes slurm.sh in the launch folder and submits it; throws naming sbatch's message.
  std::unique_ptr<Worker> start(const WorkerLaunch& l) override;
  // `pid` is the Slurm job id: nullptr unless squeue shows it pending or running under the
  // name memfit-<job id>, the job id being the name of out_path's folder. When squeue does
  // not answer (asked once for all adoptions), a worker that waits for its first answer to
  // check that name: a job is never declared gone because squeue failed.
  std::unique_ptr<Worker> adopt(int64_t pid, const std::string& out_path, int64_t offset) override;
  std::unique_ptr<Worker> gone(const std::string& out_path, int64_t offset) override;
  // scancel of every unfinished Slurm job named memfit-<id> for those ids (one squeue).
  std::map<std::string, std::string> withdraw(const std::set<std::string>& job_ids) override;

  struct Shared;

 private:
  std::shared_ptr<Shared> shared_;
  std::thread thread_;
};

}  // namespace memfit::daemon
