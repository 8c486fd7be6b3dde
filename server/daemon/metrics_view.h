// What memfitd's /metrics exports, decided apart from the exporter (metrics.cpp) and the
// core: pure functions and a plain class, unit tested in tests/daemon/test_metrics_view.cpp
// (the clock is an argument; no sleeps).
//
//   - JobSeries: one job's per-job values and labels (GaugeOf), label values made safe;
//   - ChooseFinished: which finished jobs are still exported (a retention, a cap);
//   - PeakWindow: the highest memory seen on a device between two scrapes.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "memfit/v1/service.pb.h"

namespace memfit::daemon {

// Label values come from users (job names, owners): at most this many bytes each.
inline constexpr size_t kMaxLabelBytes = 128;

// A label value that cannot break the exposition: valid UTF-8 (each byte of an invalid
// sequence and each control character becomes U+FFFD), cut to at most `max_bytes` bytes
// at a character boundary. Quotes, backslashes are left to the serializer (prometheus-cpp
// escapes them).
std::string LabelValue(std::string_view v, size_t max_bytes = kMaxLabelBytes);

// `s` with every byte that does not begin a valid UTF-8 sequence replaced by U+FFFD (the
// rest unchanged): what a strict parser (JSON, protobuf) then accepts. Used on squeue's
// output, where any cluster user's job name or folder may hold such bytes.
std::string ValidUtf8(std::string_view s);

// One exported job: the per-job gauges' values and the labels of them and of
// memfit_job_info. Every string is already a safe label value.
struct JobSeries {
  std::string id, owner, device;
  std::string state;                         // "running", "cancelling", "succeeded", "failed", "cancelled"
  std::string name, model, method, preset;   // memfit_job_info
  int64_t estimated = 0, reserved = 0, measured_peak = 0, activation_bytes = 0, activation_saved = 0;
  int64_t step = 0, total_steps = 0;
  double loss = 0;
};

// The state as a label value: v1::RUNNING -> "running".
std::string StateLabel(v1::JobState s);

// A job's series from its record: model = model.architecture; method = method.kind
// ("lora" when empty, the spec's default); preset = "auto" when memfitd picked the
// options (plan.level set), else memory.preset, "custom" when empty.
JobSeries GaugeOf(const v1::Job& j);

// Finished jobs that /metrics still exports at `now_ms`: finished less than
// `retention_ms` ago (a clock that went back counts as age 0), at most `max_jobs` of them,
// the most recently finished first (ties: by id). `drop`: the others, to forget.
struct FinishedChoice {
  std::vector<std::string> keep, drop;
};
FinishedChoice ChooseFinished(const std::map<std::string, int64_t>& finished_ms, int64_t now_ms, int64_t retention_ms,
                              size_t max_jobs);

// The highest memory seen on each device since the last scrape: the core observes a
// sample at every tick; a scrape takes the window's peak (at least the value at the
// scrape) and starts a new window.
class PeakWindow {
 public:
  void observe(const std::string& device, int64_t bytes);
  int64_t take(const std::string& device, int64_t current);

 private:
  std::map<std::string, int64_t> peak_;
};

}  // namespace memfit::daemon
