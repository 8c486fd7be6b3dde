// The job state machine's decisions as pure functions: what happens to a job when one of
// its worker attempts ends. Every path that ends an attempt (the loop, a graceful stop,
// recovery after a restart) calls Decide, so the rules live in one place and are unit
// tested without processes or clocks (tests/daemon/test_decide.cpp).
//
//   Outcome o = OutcomeOf(worker_terminal_event, exit_status);
//   Decision d = Decide({job.state(), job.oom_retries(), job.crash_retries(), reserved, largest},
//                       o, reservation_policy, retry_policy);
//   switch (d.action) { case Action::kRequeue: ... }
//
// Budgets are counted separately: an out-of-memory retry (with a larger reservation) uses
// scheduling.oom_retries; a crash, a signal, an unexplained stop or a system error on the
// outputs (disk full) uses scheduling.crash_retries. A requeue because memfitd itself is
// stopping uses neither.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "estimator.h"
#include "memfit/v1/service.pb.h"
#include "scheduler.h"

namespace memfit::daemon {

struct RetryPolicy {
  int crash_retries = 2;  // requeues after a crash, a signal or a system error
};

// How one worker attempt ended.
struct Outcome {
  enum class Ended { kFinished, kFailed, kStopped, kNoResult };
  Ended ended = Ended::kNoResult;
  std::string reason;   // kFailed: the worker's reason (oom, bad_input, io, internal)
  std::string message;  // kFailed: the worker's message
  int exit_code = -1;   // kNoResult: the exit status when known (-1: unknown)
  int signal = 0;       // kNoResult: the signal that killed it (0: none or unknown)
  bool daemon_stopping = false;  // memfitd asked the worker to stop (graceful shutdown)
};

// What the decision needs to know about the job.
struct JobFacts {
  v1::JobState state = v1::RUNNING;  // RUNNING or CANCELLING
  int oom_retries_used = 0;
  int crash_retries_used = 0;
  int64_t reservation_bytes = 0;       // this attempt's
  int64_t largest_device_bytes = 0;
};

struct Decision {
  enum class Action { kSucceed, kFail, kRequeue, kCancel };
  Action action = Action::kFail;
  // kFail
  v1::FailureKind failure_kind = v1::SYSTEM;
  std::string reason;
  // kRequeue: the next reservation, and which budget it used.
  int64_t reservation_bytes = 0;
  bool used_oom_retry = false;
  bool used_crash_retry = false;
  // The reservation was too small: feed `reservation + 1` to calibration as a lower bound.
  bool oom_lower_bound = false;
  // The event recorded with the transition.
  std::string event_kind;
  std::string message;
};

// "exit 3", "killed by signal 9 (SIGKILL)", "ended (status unknown)".
std::string DescribeExit(int exit_code, int signal);

Decision Decide(const JobFacts& job, const Outcome& outcome, const sched::ReservationPolicy& reservations,
                const RetryPolicy& retries);

// A queued job that waits for another (submit --after): what to do with it now, from the
// other job's record (nullopt: it no longer exists).
struct AfterDecision {
  enum class Action { kWait, kRelease, kCancel };
  Action action = Action::kWait;
  std::string message;  // kRelease: the event; kCancel: the reason (the job's failure message)
};
AfterDecision DecideAfter(const std::string& after_id, const std::optional<v1::Job>& after);

// The kind of job compute sharing is learned for (MemoryPlan.compute_kind): the
// calibration kind (architecture, memory options, device kind), the model's width and
// depth, the method, the dtype and micro-batch x sequence length, e.g.
// "gpt2|approx+ms_norm|cpu|d768xL12|lora|fp32|8x128". No paths: it is a metrics label.
std::string ComputeKindOf(const estimator::Input& in);

// Whether a worker failure reason is the user's to fix (USER_INPUT) rather than the system's.
bool IsUserFault(const std::string& reason);

}  // namespace memfit::daemon
