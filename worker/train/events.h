// The worker's event stream (the process contract memfitd relies on): one JSON object
// per line on stdout, flushed at once, and the same lines appended to
// <output_dir>/metrics.jsonl once the output folder exists.
//
//   {"event": "started", ...}  {"event": "step", ...}  {"event": "eval", ...}
//   {"event": "checkpoint", ...}  then one of
//   {"event": "finished", ...}  {"event": "stopped", ...}  {"event": "failed", "reason": "oom"|"bad_input"|"io"|"internal", "message": ...}
#pragma once

#include <cstdio>
#include <nlohmann/json.hpp>
#include <string>

namespace memfit::train {

// Exit codes, one per outcome.
enum ExitCode : int {
  kExitOk = 0,
  kExitInternal = 1,
  kExitBadInput = 2,
  kExitOom = 3,
  kExitStopped = 4,  // SIGTERM/SIGINT: checkpointed and stopped cleanly
  kExitIo = 5,       // the outputs could not be written (disk full, I/O error)
};

class Events {
 public:
  // Starts mirroring events into this file (append).
  void open_log(const std::string& path);
  ~Events();
  void emit(nlohmann::json event);

 private:
  std::FILE* log_ = nullptr;
};

double now_seconds();

}  // namespace memfit::train
