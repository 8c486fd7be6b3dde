// The API side of the core: submit, cancel and the views.
#include <fcntl.h>
#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/time_util.h>

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "confined.h"
#include "core.h"
#include "fit.h"
#include "report.h"

namespace memfit::daemon {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using google::protobuf::util::TimeUtil;

bool terminal(v1::JobState s) { return s == v1::SUCCEEDED || s == v1::FAILED || s == v1::CANCELLED; }
google::protobuf::Timestamp ts(int64_t ms) { return TimeUtil::MillisecondsToTimestamp(ms); }
std::string size(int64_t b) { return estimator::format_size(b); }

// A job name: at most `max` bytes of printable text (no control characters: names reach
// terminals).
void check_name(const std::string& name, int64_t max) {
  if (static_cast<int64_t>(name.size()) > max) {
    throw CoreError(Code::kInvalidArgument, "name: " + std::to_string(name.size()) + " bytes, at most " +
                                                std::to_string(max) + " (limits.max_name_bytes)");
  }
  for (const unsigned char ch : name) {
    if (ch < 0x20 || ch == 0x7f) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "0x%02x", ch);
      throw CoreError(Code::kInvalidArgument, std::string("name: holds the control character ") + buf +
                                                  "; names are printable text");
    }
  }
}

}  // namespace

v1::Job Core::submit(const Caller& c, const v1::SubmitJobRequest& r) {
  check_name(r.spec().name(), cfg_.max_name_bytes);
  if (r.request_id().size() > 256) throw CoreError(Code::kInvalidArgument, "request_id: at most 256 bytes");
  if (!c.admin && r.priority() > cfg_.max_user_priority) {
    throw CoreError(Code::kPermissionDenied, "priority: " + std::to_string(r.priority()) + " is above " +
                                                 std::to_string(cfg_.max_user_priority) +
                                                 " (limits.max_user_priority); higher priorities need an admin token");
  }
  if (!r.request_id().empty()) {
    if (auto j = store_.find_by_request(c.user, r.request_id())) return *j;
  }
  // --after: a job the caller sees, not already failed or cancelled.
  bool wait_for_after = false;
  if (!r.after().empty()) {
    const auto dep = store_.get(r.after());
    if (!dep) throw CoreError(Code::kInvalidArgument, "after: no job " + r.after());
    if (!c.admin && dep->owner() != c.user) {
      throw CoreError(Code::kPermissionDenied, "after: job " + r.after() + " belongs to another user");
    }
    const AfterDecision d = DecideAfter(r.after(), dep);
    if (d.action == AfterDecision::Action::kCancel) {
      throw CoreError(Code::kFailedPrecondition, "after: " + d.message + "; nothing to wait for");
    }
    wait_for_after = d.action == AfterDecision::Action::kWait;
  }
  char id[48];
  int64_t largest = 0;
  {
    absl::MutexLock lock(&mu_);
    std::snprintf(id, sizeof id, "j%013lld-%06llu", static_cast<long long>(now()),
                  static_cast<unsigned long long>(seq_++ % 1000000));
    largest = sched_.largest_device_bytes();
  }
  if (r.after() == id) throw CoreError(Code::kInvalidArgument, "after: a job cannot wait for itself");
  // A job that waits may read what the job before it writes (a pretrain's model, then
  // LoRA on it): when its inputs are not there yet, it is admitted (estimated, reserved,
  // its output claimed) when it is released instead, and fails then if they still are not.
  Admission a;
  std::string deferred;
  try {
    a = admit(c, r.spec(), id, largest, /*for_submit=*/true);
  } catch (const CoreError& e) {
    if (!wait_for_after || e.code == Code::kPermissionDenied) throw;
    deferred = e.what();
    a.worker_spec = r.spec();
  }
  if (deferred.empty() && a.plan.reserved_bytes() > largest) {
    std::string msg = "the job needs " + size(a.plan.reserved_bytes()) + " (estimated peak " +
                      size(a.plan.estimated_peak_bytes()) + " + " + std::to_string(static_cast<int>(cfg_.margin * 100)) +
                      "% margin) but the largest device has " + size(largest);
    if (r.spec().memory().preset() != "auto") msg += "; memory.preset: auto lets memfitd pick options that fit";
    throw CoreError(Code::kFailedPrecondition, msg);
  }
  v1::Job j;
  j.set_id(id);
  j.set_owner(c.user);
  j.set_name(r.spec().name());
  j.set_state(v1::QUEUED);
  *j.mutable_spec() = a.worker_spec;
  j.mutable_spec()->clear_name();  // stored once, in Job.name
  j.set_priority(r.priority());
  *j.mutable_created_at() = ts(now());
  *j.mutable_plan() = a.plan;
  j.set_request_id(r.request_id());
  j.set_after(r.after());
  const std::string msg =
      deferred.empty() ? "queued: estimated peak " + size(a.plan.estimated_peak_bytes()) + ", reserving " +
                             size(a.plan.reserved_bytes()) +
                             (wait_for_after ? "; placed after job " + r.after() + " succeeds" : "")
                       : "queued after job " + r.after() + "; estimated when it succeeds (not yet: " + deferred + ")";
  // A folder the user named is this job's from here on (two jobs cannot claim one
  // folder). The job's own folder in the state dir is made when it first starts.
  try {
    if (deferred.empty() && !a.output.in_state_dir) {
      const auto ids = run_ids(c.user);
      ClaimOutput(a.output, id, ids.first, ids.second);
    }
  } catch (const PathError& e) {
    if (!r.request_id().empty()) {
      if (auto prev = store_.find_by_request(c.user, r.request_id())) return *prev;  // a concurrent twin won
    }
    throw CoreError(e.kind == PathError::Kind::kDenied ? Code::kPermissionDenied : Code::kFailedPrecondition, e.what());
  }
  try {
    // The limit is checked in the insert's transaction: concurrent submits cannot pass it.
    if (!store_.insert_job(j, event("submitted", v1::QUEUED, msg, a.estimate_json), cfg_.max_queued_per_user)) {
      if (deferred.empty() && !a.output.in_state_dir) ReleaseOutput(a.output);
      throw CoreError(Code::kResourceExhausted, "user " + c.user + " already has " +
                                                    std::to_string(cfg_.max_queued_per_user) +
                                                    " queued jobs (limits.max_queued_per_user)");
    }
  } catch (const store::StoreError&) {
    if (deferred.empty() && !a.output.in_state_dir) ReleaseOutput(a.output);
    if (!r.request_id().empty()) {
      if (auto prev = store_.find_by_request(c.user, r.request_id())) return *prev;  // a concurrent twin won
    }
    throw;
  }
  if (submit_hook_) submit_hook_(j.id());
  {
    absl::MutexLock lock(&mu_);
    // A cancel that came between the insert and here already made the job CANCELLED.
    if (cancelled_in_submit_.erase(j.id()) == 0) {
      // Waiting for another job: the loop releases it (release_waiting), even if that job
      // ended between the check above and here.
      if (!j.after().empty()) waiting_[j.id()] = j.after();
      else sched_.enqueue(to_queue(j, a.plan.reserved_bytes()));
    }
    wake_.SignalAll();
    events_cv_.SignalAll();
  }
  return j;
}

v1::Job Core::load(const std::string& id) {
  auto j = store_.get(id);
  if (!j) throw CoreError(Code::kNotFound, "no job " + id);
  return *j;
}

void Core::check_access(const Caller& c, const v1::Job& j) {
  if (!c.admin && j.owner() != c.user) {
    throw CoreError(Code::kPermissionDenied, "job " + j.id() + " belongs to another user");
  }
}

v1::Job Core::get(const Caller& c, const std::string& id) {
  v1::Job j = load(id);
  check_access(c, j);
  return j;
}

v1::ListJobsResponse Core::list(const Caller& c, const v1::ListJobsRequest& r) {
  std::string owner = r.owner();
  if (!c.admin) {
    if (r.all_users() || (!owner.empty() && owner != c.user)) {
      throw CoreError(Code::kPermissionDenied, "only admins list other users' jobs");
    }
    owner = c.user;
  } else if (owner.empty() && !r.all_users()) {
    owner = c.user;
  }
  std::vector<v1::JobState> states;
  for (int s : r.states()) states.push_back(static_cast<v1::JobState>(s));
  const store::Page p = store_.list(states, owner, r.page_size(), r.page_token());
  v1::ListJobsResponse out;
  for (const auto& j : p.jobs) *out.add_jobs() = j;
  out.set_next_page_token(p.next_page_token);
  return out;
}

v1::Job Core::cancel(const Caller& c, const std::string& id) {
  check_access(c, load(id));
  absl::MutexLock lock(&mu_);
  v1::Job j = load(id);
  if (terminal(j.state()) || j.state() == v1::CANCELLING) return j;
  if (j.state() == v1::QUEUED) {
    // Not in the queue and not running: its submit is between the insert and the enqueue.
    if (!sched_.remove_queued(id) && waiting_.erase(id) == 0 && held_.erase(id) == 0 && active_.count(id) == 0 &&
        submitting_.count(id) == 0) {
      cancelled_in_submit_.insert(id);
    }
    j.set_state(v1::CANCELLED);
    *j.mutable_finished_at() = ts(now());
    record(j, "state", "cancelled by " + c.user + " while queued");
    return j;
  }
  j.set_state(v1::CANCELLING);
  record(j, "state", "cancel requested by " + c.user + "; the worker checkpoints and stops");
  auto it = active_.find(id);
  if (it != active_.end()) {
    it->second.proc->terminate();
    it->second.cancel_deadline_ms = now() + static_cast<int64_t>(cfg_.cancel_grace_seconds * 1000);
  }
  wake_.SignalAll();
  return j;
}

v1::ListJobEventsResponse Core::events(const Caller& c, const v1::ListJobEventsRequest& r) {
  check_access(c, load(r.id()));
  int64_t after = 0;
  if (!r.page_token().empty()) {
    try {
      after = std::stoll(r.page_token());
    } catch (const std::exception&) {
      throw CoreError(Code::kInvalidArgument, "page_token: not a token this server gave");
    }
  }
  const int n = std::clamp(r.page_size() <= 0 ? 100 : r.page_size(), 1, 1000);
  auto ev = store_.events(r.id(), after, n + 1);
  v1::ListJobEventsResponse out;
  for (int i = 0; i < static_cast<int>(ev.size()) && i < n; ++i) *out.add_events() = ev[static_cast<size_t>(i)];
  if (static_cast<int>(ev.size()) > n) out.set_next_page_token(std::to_string(ev[static_cast<size_t>(n - 1)].seq()));
  return out;
}

std::vector<v1::JobEvent> Core::watch(const Caller& c, const std::string& id, int64_t after_seq, int wait_ms, bool* done) {
  v1::Job j = load(id);
  check_access(c, j);
  auto ev = store_.events(id, after_seq, 1000);
  if (ev.empty() && !terminal(j.state())) {
    {
      absl::MutexLock lock(&mu_);
      events_cv_.WaitWithTimeout(&mu_, absl::Milliseconds(wait_ms));
    }
    ev = store_.events(id, after_seq, 1000);
    j = load(id);
  }
  *done = terminal(j.state()) && ev.empty();
  return ev;
}

v1::ReadJobLogResponse Core::read_log(const Caller& c, const v1::ReadJobLogRequest& r) {
  check_access(c, load(r.id()));
  const std::string stream = r.stream().empty() ? "stdout" : r.stream();
  if (stream != "stdout" && stream != "stderr") {
    throw CoreError(Code::kInvalidArgument, "stream: expected stdout or stderr, got '" + stream + "'");
  }
  if (r.offset() < 0) throw CoreError(Code::kInvalidArgument, "offset: must be 0 or more");
  const int64_t limit = r.limit() <= 0 ? 64 * 1024 : std::min<int64_t>(r.limit(), 1 << 20);
  v1::ReadJobLogResponse out;
  std::string data;
  int64_t size = 0;
  try {
    // The job's folder is memfitd's; its log files are opened without following links.
    fsx::Dir dir = fsx::Dir::open_below(rules_.jobs_dir, rules_.jobs_dir + "/" + r.id(), false);
    const int fd = dir.open(stream == "stdout" ? "worker.out" : "worker.err", O_RDONLY | O_NONBLOCK);
    struct stat st {};
    ::fstat(fd, &st);
    size = S_ISREG(st.st_mode) ? st.st_size : 0;
    const int64_t from = std::min(r.offset(), size);
    data.resize(static_cast<size_t>(std::min(limit, size - from)));
    const ssize_t n = data.empty() ? 0 : ::pread(fd, data.data(), data.size(), from);
    ::close(fd);
    data.resize(n > 0 ? static_cast<size_t>(n) : 0);
    out.set_next_offset(from + static_cast<int64_t>(data.size()));
  } catch (const fsx::FsError&) {
    out.set_next_offset(r.offset());
    return out;  // not started yet
  }
  out.set_size(size);
  out.set_data(std::move(data));
  return out;
}

v1::ListDevicesResponse Core::devices() {
  absl::MutexLock lock(&mu_);
  v1::ListDevicesResponse out;
  for (const auto& d : devices_.devices()) {
    v1::Device* x = out.add_devices();
    x->set_name(d.name);
    x->set_kind(d.kind);
    x->set_model(d.model);
    x->set_total_bytes(d.total_bytes);
    x->set_reserved_bytes(sched_.reserved_bytes(d.name));
    int64_t used = devices_.used_bytes(d.name);
    const auto ids = sched_.jobs_on(d.name);
    if (used < 0) {
      used = 0;
      for (const auto& id : ids) {
        if (auto j = store_.get(id)) used += j->progress().memory_bytes();
      }
    }
    x->set_used_bytes(used);
    for (const auto& id : ids) x->add_job_ids(id);
    x->set_committed_compute(sched_.committed_compute(d.name));
  }
  for (const auto& [kind, st] : compute_.kinds()) {
    v1::ComputeKind* k = out.add_kinds();
    k->set_kind(kind);
    k->set_solo_rate(st.solo_rate);
    k->set_shared_rate(st.shared_rate);
    k->set_shared_jobs(st.shared_jobs);
    k->set_slowdown(st.slowdown());
    k->set_compute(compute_.compute(kind));  // what placement uses (a relative's bound until learned)
    k->set_solo_steps(st.solo_steps);
    k->set_shared_steps(st.shared_steps);
  }
  return out;
}

v1::EstimateJobResponse Core::estimate(const Caller& c, const v1::EstimateJobRequest& r) {
  int64_t dev = r.device_bytes();
  if (dev <= 0) {
    absl::MutexLock lock(&mu_);
    dev = sched_.largest_device_bytes();
  }
  const Admission a = admit(c, r.spec(), "estimate", dev, /*for_submit=*/false);
  v1::EstimateJobResponse out;
  json e = json::parse(a.estimate_json);
  // The fit plan for the device size, as `memfit estimate --device-memory` gives it.
  try {
    e["fit"] = json::parse(estimator::to_json(estimator::fit(a.input, dev)).dump());
  } catch (const estimator::EstimateError& ex) {
    throw CoreError(Code::kInvalidArgument, ex.what());
  }
  out.set_estimate_json(e.dump());
  out.set_peak_bytes(a.estimate.peak_bytes);
  *out.mutable_plan() = a.plan;
  out.set_fits(a.plan.reserved_bytes() <= dev);
  return out;
}

Snapshot Core::snapshot() {
  Snapshot s;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& d : devices_.devices()) {
      const int64_t used = devices_.used_bytes(d.name);  // -1 on CPU devices: summed below
      const int64_t sample = d.kind == "cuda" && used >= 0 ? used : device_sample(d);
      s.devices.push_back({d.name, d.kind, d.total_bytes, sched_.reserved_bytes(d.name), used,
                           device_peaks_.take(d.name, sample), sched_.committed_compute(d.name)});
    }
    for (const auto& [kind, st] : compute_.kinds()) s.kinds.push_back({kind, st.slowdown(), compute_.compute(kind)});
    s.queue_length = static_cast<int64_t>(sched_.queue_length());
    s.oom_retries_total = oom_retries_total_;
    s.estimate_ratios.swap(new_ratios_);
    s.placement_seconds.swap(new_placements_);
  }
  for (int st : {v1::QUEUED, v1::RUNNING, v1::CANCELLING, v1::SUCCEEDED, v1::FAILED, v1::CANCELLED}) {
    s.jobs_by_state[st] = store_.count(static_cast<v1::JobState>(st));
  }
  std::map<std::string, int64_t> cpu_used;
  std::set<std::string> running;
  for (const auto& j : store_.in_states({v1::RUNNING, v1::CANCELLING})) {
    s.jobs.push_back(GaugeOf(j));
    running.insert(j.id());
    cpu_used[j.device()] += j.progress().memory_bytes();
  }
  for (auto& d : s.devices) {
    if (d.used < 0) d.used = cpu_used[d.name];
    d.peak = std::max(d.peak, d.used);
  }
  // Finished jobs still retained, the most recently finished first.
  absl::MutexLock lock(&recent_mu_);
  std::map<std::string, int64_t> times;
  for (const auto& [id, r] : recent_) times[id] = r.finished_ms;
  const FinishedChoice c =
      ChooseFinished(times, now(), static_cast<int64_t>(cfg_.metrics_finished_retention_seconds * 1000),
                     static_cast<size_t>(std::max<int64_t>(0, cfg_.metrics_finished_max_jobs)));
  for (const auto& id : c.drop) recent_.erase(id);
  for (const auto& id : c.keep) {
    if (running.count(id) == 0) s.jobs.push_back(recent_.at(id).series);
  }
  return s;
}

}  // namespace memfit::daemon
