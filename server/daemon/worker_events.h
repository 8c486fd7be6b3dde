// The worker's JSON-lines events (worker/train/events.h) turned into job progress and job
// events: a pure function, unit tested in tests/daemon/test_worker_events.cpp.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "memfit/v1/service.pb.h"

namespace memfit::daemon {

// What one attempt has reported so far.
struct AttemptReport {
  std::string terminal;  // the last terminal event: finished, failed, stopped ("" = none yet)
  std::string fail_reason, fail_message;
  int64_t measured_peak = 0, measured_reserved = 0;
  int64_t steps = 0;  // step events of this attempt (a resumed, already finished run has none)
  // What the worker's meter reported in this attempt: the last step's bytes in use, and
  // the highest peak so far (step and finished events).
  int64_t memory_bytes = 0, reported_peak = 0;
};

struct EventRecord {
  std::string kind;     // the job event's kind (the worker's event name)
  std::string message;  // one line for people
};

// How many of an attempt's events are stored (and reach `memfit watch`): a burst of
// kBurst, then kPerSecond a second; the attempt's first terminal event (finished, failed,
// stopped) always, later ones (a worker runs on after one) like any other.
// A worker that reports faster (a tiny model's steps, or a job's owner writing to
// worker.out with slurm.run_as: submitter) still moves the job's progress, but cannot
// grow memfit.db or hold memfitd's lock without bound. Each stored event keeps at most
// kMaxEventData bytes of the worker's line.
struct EventBudget {
  static constexpr double kBurst = 100;
  static constexpr double kPerSecond = 2;
  static constexpr size_t kMaxEventData = 16 * 1024;
  double tokens = kBurst;
  std::optional<int64_t> last_ms;  // the last event's time (none yet)
  int64_t dropped = 0;  // events not stored in this attempt
  bool terminal_stored = false;
};
// Whether an event of `kind` at `now_ms` is stored; takes its token (counts a drop).
bool TakeEvent(EventBudget& budget, const std::string& kind, int64_t now_ms);

// Applies one line to the job (progress, result) and the attempt. nullopt for a line that
// is not an event (or an event memfitd does not record). Bounded: messages are cut to
// 4 KiB, numbers clamped to be non-negative where they are sizes or counts.
std::optional<EventRecord> ApplyWorkerLine(const std::string& line, v1::Job& job, AttemptReport& attempt);

}  // namespace memfit::daemon
