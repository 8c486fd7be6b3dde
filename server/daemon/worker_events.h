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

// Applies one line to the job (progress, result) and the attempt. nullopt for a line that
// is not an event (or an event memfitd does not record). Bounded: messages are cut to
// 4 KiB, numbers clamped to be non-negative where they are sizes or counts.
std::optional<EventRecord> ApplyWorkerLine(const std::string& line, v1::Job& job, AttemptReport& attempt);

}  // namespace memfit::daemon
