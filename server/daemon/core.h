// memfitd's job manager: admission (validation, estimate, reservation), the scheduling
// loop (placements, worker events, exits, out-of-memory retries, cancellation), recovery
// after a restart, and the views the API serves. The gRPC layer (service.cpp) only
// translates; everything a job goes through happens here.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "calibration.h"
#include "config.h"
#include "devices.h"
#include "estimator.h"
#include "memfit/v1/service.pb.h"
#include "runner.h"
#include "scheduler.h"
#include "store.h"

namespace memfit::daemon {

enum class Code { kInvalidArgument, kNotFound, kPermissionDenied, kFailedPrecondition, kResourceExhausted, kInternal };

class CoreError : public std::runtime_error {
 public:
  CoreError(Code c, const std::string& m) : std::runtime_error(m), code(c) {}
  Code code;
};

struct Caller {
  std::string user = "local";
  bool admin = true;
};

// What the metrics exporter reads (metrics.cpp); plain numbers under the core's lock.
struct JobGauge {
  std::string id, owner, device;
  int64_t estimated = 0, reserved = 0, measured_peak = 0, activation_bytes = 0, activation_saved = 0;
  int64_t step = 0, total_steps = 0;
  double loss = 0;
};
struct Snapshot {
  struct Dev {
    std::string name, kind;
    int64_t total = 0, reserved = 0, used = 0;
  };
  std::vector<Dev> devices;
  std::vector<JobGauge> jobs;
  std::map<int, int64_t> jobs_by_state;  // v1::JobState -> count
  int64_t queue_length = 0;
  int64_t oom_retries_total = 0;
  std::vector<double> estimate_ratios;   // measured / estimated of finished jobs (new since last read)
  std::vector<double> placement_seconds; // queued -> placed (new since last read)
};

class Core {
 public:
  using Clock = std::function<int64_t()>;  // milliseconds since the epoch
  Core(Config cfg, store::Store& store, DeviceMonitor& devices, Clock clock = {});
  ~Core();

  // Recovers state from the store (queued jobs, running workers) and starts the loop.
  void start();
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
  Snapshot snapshot();

  // One pass of the loop (tests drive it directly).
  void tick();

 private:
  struct Active {
    WorkerProcess proc;
    std::string device;
    int64_t reservation = 0;
    int64_t cancel_deadline_ms = 0;  // SIGKILL after it (0 = none)
    std::string terminal;            // the worker's last terminal event: finished, failed, stopped
    std::string fail_reason, fail_message;
    int64_t measured_peak = 0, measured_reserved = 0;
    int64_t steps = 0;  // step events of this attempt (a resumed, already finished run has none)
  };
  struct Admission {
    v1::JobSpec worker_spec;  // what the worker runs (auto options applied)
    v1::MemoryPlan plan;
    std::string key;          // calibration kind
    estimator::Estimate estimate;
    std::string estimate_json;
    estimator::Input input;   // the job as submitted (before `auto` options), for a fit plan
  };

  Admission admit(const v1::JobSpec& spec, const std::string& job_id, int64_t device_bytes);
  v1::Job load(const std::string& id);
  void check_access(const Caller& c, const v1::Job& j);
  v1::JobEvent event(const std::string& kind, v1::JobState st, const std::string& msg, const std::string& data = "");
  void record(v1::Job& j, const std::string& kind, const std::string& msg, const std::string& data = "");
  void start_worker(const sched::Placement& p);
  void poll(const std::string& id, Active& a);
  void finish(const std::string& id, Active& a);
  void requeue(v1::Job& j, int64_t reservation, const std::string& kind, const std::string& why);
  void loop();
  int64_t now() const { return clock_(); }
  estimator::DeviceModel device_model() const;

  Config cfg_;
  store::Store& store_;
  DeviceMonitor& devices_;
  Clock clock_;
  sched::Scheduler sched_;
  sched::ReservationPolicy policy_;
  estimator::Calibration calibration_;
  std::mutex mu_;
  std::condition_variable events_cv_;
  std::condition_variable wake_;
  std::map<std::string, Active> active_;
  uint64_t seq_ = 0;
  std::atomic<bool> running_{false};
  std::thread thread_;
  int64_t oom_retries_total_ = 0;
  std::vector<double> new_ratios_, new_placements_;
};

}  // namespace memfit::daemon
