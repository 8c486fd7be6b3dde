#include "decide.h"

#include <string.h>

#include "calibration.h"
#include "estimator.h"

namespace memfit::daemon {
namespace {

std::string size(int64_t b) { return estimator::format_size(b); }

Decision Requeue(int64_t reservation, const std::string& kind, const std::string& message) {
  Decision d;
  d.action = Decision::Action::kRequeue;
  d.reservation_bytes = reservation;
  d.event_kind = kind;
  d.message = message;
  return d;
}

Decision Fail(v1::FailureKind kind, const std::string& reason, const std::string& message) {
  Decision d;
  d.action = Decision::Action::kFail;
  d.failure_kind = kind;
  d.reason = reason;
  d.event_kind = "state";
  d.message = message;
  return d;
}

// A retry after a system fault (crash, signal, I/O error), from the crash budget.
Decision RetryOrFail(const JobFacts& job, const RetryPolicy& retries, const std::string& reason,
                     const std::string& what) {
  if (job.crash_retries_used < retries.crash_retries) {
    Decision d = Requeue(job.reservation_bytes, "requeued",
                         what + "; it resumes from its last checkpoint (retry " +
                             std::to_string(job.crash_retries_used + 1) + " of " +
                             std::to_string(retries.crash_retries) + ")");
    d.used_crash_retry = true;
    return d;
  }
  return Fail(v1::SYSTEM, reason,
              what + "; no retries left (" + std::to_string(retries.crash_retries) + " used, scheduling.crash_retries)");
}

}  // namespace

std::string DescribeExit(int exit_code, int signal) {
  if (signal > 0) {
    const char* name = sigabbrev_np(signal);
    return "killed by signal " + std::to_string(signal) + (name ? std::string(" (SIG") + name + ")" : "");
  }
  if (exit_code >= 0) return "exit " + std::to_string(exit_code);
  return "ended (exit status unknown: the worker was adopted after a restart)";
}

bool IsUserFault(const std::string& reason) { return reason == "bad_input"; }

Decision Decide(const JobFacts& job, const Outcome& o, const sched::ReservationPolicy& reservations,
                const RetryPolicy& retries) {
  using Ended = Outcome::Ended;
  // A finished run wrote its outputs: a cancel that raced the end does not hide them.
  if (o.ended == Ended::kFinished) {
    Decision d;
    d.action = Decision::Action::kSucceed;
    d.event_kind = "state";
    d.message = job.state == v1::CANCELLING ? "succeeded (the run finished before the cancel took effect)" : "succeeded";
    return d;
  }
  if (job.state == v1::CANCELLING) {
    Decision d;
    d.action = Decision::Action::kCancel;
    d.event_kind = "state";
    d.message = "cancelled";
    return d;
  }
  if (o.daemon_stopping && (o.ended == Ended::kStopped || o.ended == Ended::kNoResult)) {
    return Requeue(job.reservation_bytes, "requeued",
                   "memfitd is stopping; the job resumes from its checkpoint at the next start");
  }
  switch (o.ended) {
    case Ended::kFinished:
      break;  // handled above
    case Ended::kFailed: {
      if (o.reason == "oom") {
        const int64_t next = reservations.after_oom(job.reservation_bytes, job.oom_retries_used + 1,
                                                     job.largest_device_bytes);
        if (next > 0) {
          Decision d = Requeue(next, "oom",
                               "out of memory with " + size(job.reservation_bytes) + " reserved; queued again with " +
                                   size(next) + " (retry " + std::to_string(job.oom_retries_used + 1) + " of " +
                                   std::to_string(reservations.max_oom_retries) + ")");
          d.used_oom_retry = true;
          d.oom_lower_bound = true;
          return d;
        }
        Decision d = Fail(v1::SYSTEM, "oom",
                          "out of memory with " + size(job.reservation_bytes) + " reserved, after " +
                              std::to_string(job.oom_retries_used) + " out-of-memory retries");
        d.oom_lower_bound = true;
        return d;
      }
      if (IsUserFault(o.reason)) return Fail(v1::USER_INPUT, o.reason, o.message);
      if (o.reason == "io") return RetryOrFail(job, retries, "io", "the worker could not write its outputs: " + o.message);
      return Fail(v1::SYSTEM, o.reason.empty() ? "internal" : o.reason, o.message);
    }
    case Ended::kStopped:
      return RetryOrFail(job, retries, "crashed", "the worker stopped after a checkpoint without being asked to");
    case Ended::kNoResult:
      return RetryOrFail(job, retries, "crashed",
                         "the worker ended without a result (" + DescribeExit(o.exit_code, o.signal) + ")");
  }
  return Fail(v1::SYSTEM, "internal", "unexpected outcome");
}

AfterDecision DecideAfter(const std::string& after_id, const std::optional<v1::Job>& after) {
  AfterDecision d;
  if (!after) {
    d.action = AfterDecision::Action::kCancel;
    d.message = "job " + after_id + ", which this job waited for (after), no longer exists";
    return d;
  }
  switch (after->state()) {
    case v1::SUCCEEDED:
      d.action = AfterDecision::Action::kRelease;
      d.message = "job " + after_id + " succeeded; this job can be placed";
      break;
    case v1::FAILED:
      d.action = AfterDecision::Action::kCancel;
      d.message = "job " + after_id + ", which this job waited for (after), failed" +
                  (after->failure().message().empty() ? std::string() : ": " + after->failure().message());
      break;
    case v1::CANCELLED:
      d.action = AfterDecision::Action::kCancel;
      d.message = "job " + after_id + ", which this job waited for (after), was cancelled";
      break;
    default:
      d.action = AfterDecision::Action::kWait;  // queued, running, cancelling: not decided yet
      break;
  }
  return d;
}

std::string ComputeKindOf(const estimator::Input& in) {
  const spec::Training& t = in.job.training;
  return estimator::Calibration::key_of(in) + "|d" + std::to_string(in.config.hidden) + "xL" +
         std::to_string(in.config.layers) + "|" + spec::name_of(in.job.method) + "|" +
         (t.dtype == spec::DType::kBFloat16 ? "bf16" : "fp32") + "|" + std::to_string(t.micro_batch) + "x" +
         std::to_string(t.sequence_length);
}

}  // namespace memfit::daemon
