// memfitd's job manager: admission (paths, validation, estimate, reservation), the
// scheduling loop (placements, worker events, the end of each attempt), recovery after a
// restart, and the views the API serves. The gRPC layer (service.cpp) only translates.
//
// Files: core.cpp (life cycle, loop, attempts), core_api.cpp (submit, cancel, views),
// admission.cpp (what a spec becomes), with the decisions as pure functions in
// decide.* (how an attempt's end moves the job), worker_events.* (worker lines ->
// progress) and paths.* (where files may be).
//
// Threading: gRPC handler threads call the API; one loop thread runs tick() (with the
// Slurm executor, tick's sbatch run in helper threads that end before it returns). `mu_`
// guards the scheduler, the running attempts and the counters; the store has its own lock
// and may be called under mu_ (it never calls back). Waits on
// `mu_` use absl::CondVar. Built with clang -Wthread-safety in the tests
// (tests/daemon/thread_safety_check.py), so a member touched without its lock fails.
#pragma once

#include <absl/base/thread_annotations.h>
#include <absl/synchronization/mutex.h>

#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "calibration.h"
#include "compute_model.h"
#include "config.h"
#include "decide.h"
#include "devices.h"
#include "estimator.h"
#include "metrics_view.h"
#include "memfit/v1/service.pb.h"
#include "paths.h"
#include "runner.h"
#include "scheduler.h"
#include "store.h"
#include "worker_events.h"

namespace memfit::daemon {

enum class Code {
  kInvalidArgument,
  kNotFound,
  kPermissionDenied,
  kFailedPrecondition,
  kResourceExhausted,
  kInternal,
  kUnavailable
};

class CoreError : public std::runtime_error {
 public:
  CoreError(Code c, const std::string& m) : std::runtime_error(m), code(c) {}
  Code code;
};

struct Caller {
  std::string user = "local";
  bool admin = true;
};

// What the metrics exporter reads (metrics.cpp): plain values taken under the core's
// locks. `jobs`: the running jobs and the finished ones still retained
// (metrics.finished_retention_seconds), each with its state.
struct Snapshot {
  struct Dev {
    std::string name, kind;
    int64_t total = 0, reserved = 0, used = 0;
    int64_t peak = 0;  // the highest sample since the previous snapshot (PeakWindow)
    double committed_compute = 0;
  };
  // Compute sharing learned per kind of job (sched::ComputeModel).
  struct Kind {
    std::string kind;
    double slowdown = 0, compute = 1;
  };
  std::vector<Kind> kinds;
  std::vector<Dev> devices;
  std::vector<JobSeries> jobs;
  std::map<int, int64_t> jobs_by_state;  // v1::JobState -> count
  int64_t queue_length = 0;
  int64_t oom_retries_total = 0;
  std::vector<double> estimate_ratios;   // measured / estimated of finished jobs (new since last read)
  std::vector<double> placement_seconds; // queued -> placed (new since last read)
};

class Core {
 public:
  using Clock = std::function<int64_t()>;  // milliseconds since the epoch
  // `launcher` starts workers (nullptr: real processes). Tests pass a fake launcher and a
  // fake clock and drive tick() themselves.
  Core(Config cfg, store::Store& store, DeviceMonitor& devices, Clock clock = {},
       WorkerLauncher* launcher = nullptr);
  ~Core();

  // Recovers state from the store (queued jobs, running workers, corrupt records) and,
  // unless `run_loop` is false (tests), starts the loop thread.
  void start(bool run_loop = true);
  // Stops the loop. graceful: workers are asked to checkpoint and stop (SIGTERM), their
  // jobs go back to the queue to resume at the next start.
  void stop(bool graceful);

  v1::Job submit(const Caller& c, const v1::SubmitJobRequest& r);
  v1::Job get(const Caller& c, const std::string& id);
  v1::ListJobsResponse list(const Caller& c, const v1::ListJobsRequest& r);
  v1::Job cancel(const Caller& c, const std::string& id);
  v1::ListJobEventsResponse events(const Caller& c, const v1::ListJobEventsRequest& r);
  // Events after `after_seq`, waiting up to `wait_ms` for one; `done` is set when the job
  // has reached a final state and every event was returned.
  std::vector<v1::JobEvent> watch(const Caller& c, const std::string& id, int64_t after_seq, int wait_ms, bool* done);
  v1::ReadJobLogResponse read_log(const Caller& c, const v1::ReadJobLogRequest& r);
  v1::ListDevicesResponse devices();
  v1::EstimateJobResponse estimate(const Caller& c, const v1::EstimateJobRequest& r);
  // For /metrics. Each call ends the devices' peak window (the next one reports the peak
  // since this one) and hands over the histogram samples gathered since the last call.
  Snapshot snapshot();

  // One pass of the loop (tests drive it directly). Throws what the store throws.
  void tick() ABSL_LOCKS_EXCLUDED(mu_);
  // Tests: called inside submit between the store's insert and the enqueue, where a
  // racing cancel can land.
  void set_submit_hook_for_test(std::function<void(const std::string& id)> hook) { submit_hook_ = std::move(hook); }

 private:
  struct Active {
    std::unique_ptr<Worker> proc;
    std::string device;
    int64_t reservation = 0;
    int64_t cancel_deadline_ms = 0;  // SIGKILL after it (0 = none)
    bool stopping = false;           // memfitd asked it to stop (graceful shutdown)
    AttemptReport report;
    EventBudget events;        // which of its events are stored
    std::string compute_kind;  // MemoryPlan.compute_kind ("" for jobs admitted before it existed)
  };
  struct Admission {
    v1::JobSpec worker_spec;  // what the worker runs (auto options applied, output placed)
    OutputPlace output;
    v1::MemoryPlan plan;
    std::string key;          // calibration kind
    estimator::Estimate estimate;
    std::string estimate_json;
    estimator::Input input;   // the job as submitted (before `auto` options), for a fit plan
  };

  // `for_submit`: also check that the output folder can be claimed (an estimate does not).
  Admission admit(const Caller& c, const v1::JobSpec& spec, const std::string& job_id, int64_t device_bytes,
                  bool for_submit) ABSL_LOCKS_EXCLUDED(mu_);
  v1::Job load(const std::string& id);
  void check_access(const Caller& c, const v1::Job& j);
  v1::JobEvent event(const std::string& kind, v1::JobState st, const std::string& msg, const std::string& data = "");
  void record(v1::Job& j, const std::string& kind, const std::string& msg, const std::string& data = "");
  // Starting an attempt, in three parts: prepare_start under the lock (the job's folder,
  // spec and output claimed, the launch built; nullopt when there is nothing to start or
  // it failed), the launcher's start (without the lock for the Slurm executor: tick), then
  // commit_start under the lock (recorded as running, or withdrawn when the job was
  // cancelled meanwhile, or start_failed with the launcher's error).
  struct Starting {
    sched::Placement placement;
    v1::Job job;  // as prepared: attempts, device and reservation of this attempt
    WorkerLaunch launch;
    int64_t queued_ms = 0;
  };
  // tick's part under the lock: workers polled and finished, waiting and held jobs
  // released, and what the scheduler places now, prepared.
  // A store error on one placement is kept in *error (the first) for the caller to throw
  // once the others are started.
  std::vector<Starting> tick_locked(std::exception_ptr* error) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::optional<Starting> prepare_start(const sched::Placement& p) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The launcher's start of one placement; nullptr with the message in *error when it
  // fails. Takes no lock (tick calls it with or without mu_).
  std::unique_ptr<Worker> launch(const Starting& st, std::string* error);
  // The Slurm executor's part of tick without the lock: each placement launched (up to
  // slurm.parallel_submissions at once, in threads that end before it returns) and
  // committed under mu_ as soon as its launcher answers.
  void submit_all(std::vector<Starting>& starting, std::exception_ptr* error) ABSL_LOCKS_EXCLUDED(mu_);
  // A store error stops what was started, gives the place back and queues the job again
  // (held_); the first is kept in *store_error for tick to throw.
  void commit_start(Starting& s, std::unique_ptr<Worker> proc, const std::string& error,
                    std::exception_ptr* store_error) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // commit_start's work; `proc` is moved into active_ only once the store has it all.
  void commit_placed(Starting& s, std::unique_ptr<Worker>& proc, const std::string& error)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The executor could not start it: Slurm's jobs back to the queue after a back-off on
  // their crash budget, anything else failed as the system's fault.
  void start_failed(v1::Job& j, const std::string& why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The scheduler's entry for a queued job: its reservation and learned compute share.
  sched::QueuedJob to_queue(const v1::Job& j, int64_t reservation) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  WorkerLaunch launch_of(const v1::Job& j, const sched::Placement& p, const OutputPlace& out)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The worker's new lines applied.
  void poll(const std::string& id, Active& a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // After the process is gone: its remaining lines, until a read consumes nothing, at most
  // 32 reads (320000 event lines; the terminal event is the last).
  void drain(const std::string& id, Active& a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The attempt is over (the process is gone): decide, apply, free the reservation.
  void finish(const std::string& id, Active& a) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void requeue(v1::Job& j, int64_t reservation, const std::string& kind, const std::string& why)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Waiting jobs admitted at submit without their inputs (written by the job they wait
  // for): admitted now that it succeeded (estimate, reservation, output), or failed.
  void admit_released() ABSL_LOCKS_EXCLUDED(mu_);
  // The jobs in waiting_ whose other job ended: placed in the queue, or cancelled.
  void release_waiting() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A record that could not be read: the job fails (SYSTEM, corrupt_record).
  void fail_corrupt(v1::Job stub);
  void loop();
  // Memory in use on a device for its peak: NVML's used bytes on a GPU; on a CPU device
  // the sum of its running attempts' highest reported memory (the workers' meters report
  // between steps, and a step's peak only as the peak so far).
  int64_t device_sample(const DeviceInfo& d) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // A job reached a final state: keep its series for metrics.finished_retention_seconds.
  void remember_finished(const v1::Job& j) ABSL_LOCKS_EXCLUDED(recent_mu_);
  int64_t now() const { return clock_(); }
  // Who the job's worker runs as: workers.user (uid, gid; -1 = memfitd's own), or with
  // slurm.run_as: submitter the Unix user named like the job's owner (CoreError if none).
  std::pair<int64_t, int64_t> run_ids(const std::string& owner) const;
  static std::unique_ptr<WorkerLauncher> make_launcher(const Config& cfg, Clock clock);
  estimator::DeviceModel device_model() const;

  const Config cfg_;
  const PathRules rules_;
  store::Store& store_;
  DeviceMonitor& devices_;
  Clock clock_;
  std::unique_ptr<WorkerLauncher> own_launcher_;
  WorkerLauncher* launcher_;
  const RetryPolicy retry_;

  absl::Mutex mu_;
  absl::CondVar events_cv_;  // a job event was recorded (watchers)
  absl::CondVar wake_;       // the loop has work
  sched::Scheduler sched_ ABSL_GUARDED_BY(mu_);
  sched::ReservationPolicy policy_;  // set in the constructor, read-only after
  estimator::Calibration calibration_ ABSL_GUARDED_BY(mu_);
  // Compute sharing learned from the workers' step throughput (poll), per compute kind.
  sched::ComputeModel compute_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, Active> active_ ABSL_GUARDED_BY(mu_);
  // Queued jobs waiting for another job (submit --after): id -> the other job's id. Not in
  // the scheduler until DecideAfter releases them (tick); cancelled with the reason when
  // the other job fails or is cancelled.
  std::map<std::string, std::string> waiting_ ABSL_GUARDED_BY(mu_);
  // Jobs whose submission to the executor failed (sbatch: a controller down) and that wait
  // out a back-off before they are queued again: id -> when (ms).
  std::map<std::string, int64_t> held_ ABSL_GUARDED_BY(mu_);
  // Placed jobs whose executor is being asked to start them without the lock (tick).
  std::set<std::string> submitting_ ABSL_GUARDED_BY(mu_);
  // Cancelled between their insert and their enqueue (a submit still in flight).
  std::set<std::string> cancelled_in_submit_ ABSL_GUARDED_BY(mu_);
  uint64_t seq_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t oom_retries_total_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<double> new_ratios_ ABSL_GUARDED_BY(mu_);
  std::vector<double> new_placements_ ABSL_GUARDED_BY(mu_);
  PeakWindow device_peaks_ ABSL_GUARDED_BY(mu_);
  // Finished jobs whose series /metrics still exports (a leaf lock: taken under mu_ or
  // alone, nothing taken under it).
  struct Retained {
    JobSeries series;
    int64_t finished_ms = 0;
  };
  absl::Mutex recent_mu_;
  std::map<std::string, Retained> recent_ ABSL_GUARDED_BY(recent_mu_);
  // The loop's store-error backoff: the last message and when it was last logged.
  std::string last_loop_error_;
  int64_t last_loop_error_logged_ms_ = 0;
  std::function<void(const std::string&)> submit_hook_;
  std::atomic<bool> running_{false};
  std::thread thread_;
};

}  // namespace memfit::daemon
