#include "worker_events.h"

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "estimator.h"

namespace memfit::daemon {
namespace {

using json = nlohmann::json;

template <typename T>
T get(const json& e, const char* key, T fallback) {
  const auto it = e.find(key);
  if (it == e.end()) return fallback;
  try {
    return it->get<T>();
  } catch (const json::exception&) {
    return fallback;
  }
}

// A size or count from the worker, in [0, 2^48] (256 TiB, far above any device): memfitd
// adds the reports of many workers (a partition's used bytes), which must not overflow.
int64_t size_of(const json& e, const char* key, int64_t fallback = 0) {
  constexpr int64_t kMax = int64_t{1} << 48;
  const auto it = e.find(key);
  if (it != e.end() && it->is_number_float()) {  // 1e300 would not fit the cast
    const double d = it->get<double>();
    return !(d > 0) ? 0 : d >= static_cast<double>(kMax) ? kMax : static_cast<int64_t>(d);
  }
  return std::clamp<int64_t>(get<int64_t>(e, key, fallback), 0, kMax);
}

// At most 4096 bytes, cut between characters: the parser let only valid UTF-8 through,
// and half a character would make the job's record unreadable (protobuf refuses to parse
// a string field that is not UTF-8).
std::string text(const json& e, const char* key, const std::string& fallback = "") {
  std::string s = get<std::string>(e, key, fallback);
  if (s.size() > 4096) {
    size_t n = 4096;
    while (n > 0 && (static_cast<unsigned char>(s[n]) & 0xC0) == 0x80) --n;  // s[n] begins a character
    s.resize(n);
  }
  return s;
}

}  // namespace

bool TakeEvent(EventBudget& b, const std::string& kind, int64_t now_ms) {
  // A clock that steps back adds nothing, and refills from where it now is (a step back
  // of an hour must not silence a job for an hour); a step forward adds at most kBurst.
  if (b.last_ms && now_ms > *b.last_ms) {
    b.tokens = std::min(EventBudget::kBurst,
                        b.tokens + EventBudget::kPerSecond * static_cast<double>(now_ms - *b.last_ms) / 1000.0);
  }
  b.last_ms = now_ms;
  if ((kind == "finished" || kind == "failed" || kind == "stopped") && !b.terminal_stored) {
    b.terminal_stored = true;
    return true;
  }
  if (b.tokens >= 1.0) {
    b.tokens -= 1.0;
    return true;
  }
  ++b.dropped;
  return false;
}

std::optional<EventRecord> ApplyWorkerLine(const std::string& line, v1::Job& j, AttemptReport& a) {
  json e;
  try {
    e = json::parse(line);
  } catch (const json::exception&) {
    return std::nullopt;  // not an event line
  }
  if (!e.is_object()) return std::nullopt;
  const std::string kind = text(e, "event");
  v1::Progress* pr = j.mutable_progress();
  EventRecord r{kind, ""};
  if (kind == "started") {
    pr->set_total_steps(size_of(e, "total_steps"));
    r.message = "training " + std::to_string(pr->total_steps()) + " steps";
  } else if (kind == "step") {
    ++a.steps;
    pr->set_step(size_of(e, "step"));
    pr->set_total_steps(size_of(e, "total_steps", pr->total_steps()));
    pr->set_loss(get<double>(e, "loss", 0.0));
    pr->set_learning_rate(get<double>(e, "lr", 0.0));
    pr->set_samples_per_second(get<double>(e, "samples_per_second", 0.0));
    pr->set_tokens_per_second(get<double>(e, "tokens_per_second", 0.0));
    pr->set_memory_bytes(size_of(e, "memory_bytes"));
    pr->set_peak_memory_bytes(std::max(pr->peak_memory_bytes(), size_of(e, "peak_memory_bytes")));
    a.memory_bytes = pr->memory_bytes();
    a.reported_peak = std::max({a.reported_peak, a.memory_bytes, size_of(e, "peak_memory_bytes")});
    if (e.contains("activation_bytes")) pr->set_activation_bytes(size_of(e, "activation_bytes"));
    char buf[96];
    std::snprintf(buf, sizeof buf, "step %lld/%lld loss %.4f", static_cast<long long>(pr->step()),
                  static_cast<long long>(pr->total_steps()), pr->loss());
    r.message = buf;
  } else if (kind == "eval") {
    pr->set_eval_loss(get<double>(e, "loss", 0.0));
    if (e.contains("accuracy")) pr->set_eval_accuracy(get<double>(e, "accuracy", 0.0));
    r.message = "eval loss " + std::to_string(pr->eval_loss());
  } else if (kind == "checkpoint") {
    pr->set_last_checkpoint(text(e, "path"));
    r.message = "checkpoint " + pr->last_checkpoint();
  } else if (kind == "finished") {
    a.terminal = "finished";
    a.measured_peak = size_of(e, "peak_memory_bytes");
    a.measured_reserved = size_of(e, "peak_reserved_bytes");
    a.reported_peak = std::max(a.reported_peak, a.measured_peak);
    pr->set_peak_memory_bytes(std::max(pr->peak_memory_bytes(), a.measured_peak));
    if (e.contains("activation_bytes")) pr->set_activation_bytes(size_of(e, "activation_bytes"));
    v1::JobResult* res = j.mutable_result();
    if (e.contains("output") && e["output"].is_object()) {
      res->set_adapter_dir(text(e["output"], "adapter"));
      res->set_model_dir(text(e["output"], "model"));
    }
    if (e.contains("eval") && e["eval"].is_object()) {
      res->set_eval_loss(get<double>(e["eval"], "loss", 0.0));
      if (e["eval"].contains("accuracy")) res->set_eval_accuracy(get<double>(e["eval"], "accuracy", 0.0));
    }
    res->set_measured_peak_bytes(a.measured_peak);
    res->set_early_stopped(get<bool>(e, "early_stopped", false));
    r.message = "finished; measured peak " + estimator::format_size(a.measured_peak);
  } else if (kind == "failed") {
    a.terminal = "failed";
    a.fail_reason = text(e, "reason", "internal");
    a.fail_message = text(e, "message");
    r.message = a.fail_reason + ": " + a.fail_message;
  } else if (kind == "stopped") {
    a.terminal = "stopped";
    r.message = "stopped after a checkpoint";
  } else {
    return std::nullopt;
  }
  return r;
}

}  // namespace memfit::daemon
