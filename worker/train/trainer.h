// The training loop of memfit-worker: builds the model and data from a job, trains
// with AdamW, evaluates, checkpoints (resuming exactly from the latest checkpoint in
// the output folder), stops early on validation loss, stops cleanly on SIGTERM, and
// writes the result (a PEFT LoRA adapter or full safetensors weights).
#pragma once

#include <atomic>
#include <cstdint>
#include <string>

#include "events.h"
#include "spec.h"

namespace memfit::train {

struct RunOptions {
  std::string device;          // overrides the spec's resources.devices[0] when set
  int64_t memory_limit = 0;    // CPU: the meter's hard cap in bytes; 0 = none
  int64_t max_steps = 0;       // stop (with a checkpoint) after this many steps this run
  int threads = 0;             // ATen threads; 0 = all cores
  int64_t fit_bytes = 0;       // memory.preset auto: the memory to fit the plan into
                               // (0: the CPU --memory-limit)
};

// Set by the signal handler; the loop checks it at step boundaries.
extern std::atomic<bool> g_stop_requested;

// Runs the job; returns the process exit code. Emits every event, including the final
// `failed` one, so that callers only map the code.
int run_job(const spec::Job& job, const std::string& spec_text, const RunOptions& opts, Events& events);

}  // namespace memfit::train
