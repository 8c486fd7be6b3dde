#include "core.h"

#include <fcntl.h>
#include <pwd.h>
#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/time_util.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <random>
#include <system_error>
#include <thread>

#include "confined.h"
#include "slurm.h"

namespace memfit::daemon {
namespace {

namespace fs = std::filesystem;
using google::protobuf::util::TimeUtil;

google::protobuf::Timestamp ts(int64_t ms) { return TimeUtil::MillisecondsToTimestamp(ms); }
int64_t ms_of(const google::protobuf::Timestamp& t) { return TimeUtil::TimestampToMilliseconds(t); }
std::string size(int64_t b) { return estimator::format_size(b); }

std::vector<sched::Device> sched_devices(const DeviceMonitor& d) {
  std::vector<sched::Device> out;
  for (const auto& x : d.devices()) out.push_back({x.name, x.total_bytes, x.max_job_bytes});
  return out;
}

sched::ReservationPolicy reservation_policy(const Config& c) {
  sched::ReservationPolicy p;
  p.margin = c.margin;
  p.oom_growth = c.oom_growth;
  p.max_oom_retries = c.oom_retries;
  return p;
}

}  // namespace

Core::Core(Config cfg, store::Store& store, DeviceMonitor& devices, Clock clock, WorkerLauncher* launcher)
    : cfg_(std::move(cfg)),
      rules_(PathRules::From(cfg_)),
      store_(store),
      devices_(devices),
      clock_(clock ? std::move(clock)
                   : Clock([] {
                       return std::chrono::duration_cast<std::chrono::milliseconds>(
                                  std::chrono::system_clock::now().time_since_epoch())
                           .count();
                     })),
      own_launcher_(launcher ? nullptr : make_launcher(cfg_, clock_)),
      launcher_(launcher ? launcher : own_launcher_.get()),
      retry_{cfg_.crash_retries},
      sched_(sched_devices(devices), sched::Options{static_cast<int64_t>(cfg_.starvation_minutes * 60000.0),
                                                    cfg_.placement == "best_fit" ? sched::PlacementPolicy::kBestFit
                                                                                 : sched::PlacementPolicy::kSpread}),
      policy_(reservation_policy(cfg_)) {
  std::random_device rd;
  absl::MutexLock lock(&mu_);
  seq_ = (static_cast<uint64_t>(rd()) << 8) % 1000000;
}

Core::~Core() { stop(false); }

std::unique_ptr<WorkerLauncher> Core::make_launcher(const Config& cfg, Clock clock) {
  if (cfg.executor == "slurm") {
    return std::make_unique<SlurmLauncher>(
        cfg.slurm, [](const std::vector<std::string>& argv) { return RunCommand(argv, 30000); }, std::move(clock),
        /*background=*/true);
  }
  return std::make_unique<ProcessLauncher>();
}

std::pair<int64_t, int64_t> Core::run_ids(const std::string& owner) const {
  if (cfg_.executor != "slurm" || cfg_.slurm.run_as != "submitter") return {cfg_.worker_uid, cfg_.worker_gid};
  // slurm.run_as: submitter: the job runs as the Unix user its owner's name is (sbatch --uid).
  passwd pw{};
  passwd* found = nullptr;
  std::vector<char> buf(16384);
  if (::getpwnam_r(owner.c_str(), &pw, buf.data(), buf.size(), &found) != 0 || found == nullptr) {
    throw CoreError(Code::kFailedPrecondition,
                    "slurm.run_as is submitter, but there is no Unix user named '" + owner + "' to run the job as");
  }
  // Never root, a system account (below 1000: slurm, munge, daemons) or memfitd's own user.
  if (found->pw_uid == 0 || (found->pw_uid < 1000 && found->pw_uid != 65534) || found->pw_uid == ::geteuid()) {
    throw CoreError(Code::kPermissionDenied, "slurm.run_as is submitter: jobs never run as root, a system account or "
                                             "memfitd's own user ('" + owner + "' is uid " +
                                             std::to_string(found->pw_uid) + ")");
  }
  return {found->pw_uid, found->pw_gid};
}

// ---- events ----

v1::JobEvent Core::event(const std::string& kind, v1::JobState st, const std::string& msg, const std::string& data) {
  v1::JobEvent e;
  *e.mutable_time() = ts(now());
  e.set_kind(kind);
  e.set_state(st);
  e.set_message(msg);
  e.set_data_json(data);
  return e;
}

void Core::record(v1::Job& j, const std::string& kind, const std::string& msg, const std::string& data) {
  store_.append_event(j, event(kind, j.state(), msg, data));
  if (j.state() == v1::SUCCEEDED || j.state() == v1::FAILED || j.state() == v1::CANCELLED) remember_finished(j);
  events_cv_.SignalAll();
}

void Core::remember_finished(const v1::Job& j) {
  // Only jobs that were placed had series; a job cancelled in the queue never had any.
  if (j.attempts() == 0 || cfg_.metrics_finished_retention_seconds <= 0 || cfg_.metrics_finished_max_jobs <= 0) return;
  const int64_t t = j.has_finished_at() ? ms_of(j.finished_at()) : now();
  absl::MutexLock lock(&recent_mu_);
  recent_[j.id()] = {GaugeOf(j), t};
  // Bounded without scrapes too: prune when twice the cap is held.
  if (static_cast<int64_t>(recent_.size()) > 2 * cfg_.metrics_finished_max_jobs) {
    std::map<std::string, int64_t> times;
    for (const auto& [id, r] : recent_) times[id] = r.finished_ms;
    for (const auto& id : ChooseFinished(times, now(), static_cast<int64_t>(cfg_.metrics_finished_retention_seconds * 1000),
                                         static_cast<size_t>(cfg_.metrics_finished_max_jobs))
                              .drop) {
      recent_.erase(id);
    }
  }
}

// ---- start, recovery ----

void Core::fail_corrupt(v1::Job stub) {
  stub.set_state(v1::FAILED);
  *stub.mutable_finished_at() = ts(now());
  std::fprintf(stderr, "memfitd: job %s: its record could not be read; marked failed\n", stub.id().c_str());
  record(stub, "state", "failed: the job's record in memfit.db could not be read (corrupt_record)");
}

void Core::start(bool run_loop) {
  std::error_code ec;
  fs::create_directories(rules_.jobs_dir, ec);
  ::chmod(rules_.jobs_dir.c_str(), 0711);  // workers reach their own folder, list none
  ::chmod(rules_.state_dir.c_str(), 0711);
  std::map<std::string, store::WorkerRecord> workers;
  for (const auto& w : store_.workers()) workers[w.job_id] = w;
  const auto queued = store_.in_states({v1::QUEUED});
  const auto running = store_.in_states({v1::RUNNING, v1::CANCELLING});
  const auto cancelled = store_.in_states({v1::CANCELLED});
  absl::MutexLock lock(&mu_);
  // Calibration from finished jobs.
  for (const auto& row : store_.calibration(static_cast<int>(estimator::Calibration::kWindow))) {
    try {
      calibration_.add({row.key, row.estimated_bytes, row.measured_bytes});
    } catch (const estimator::EstimateError&) {
    }
  }
  // What earlier runs learned of each kind of job's compute share.
  for (const auto& row : store_.compute_kinds()) {
    sched::ComputeModel::Stats st;
    st.solo_steps = row.solo_steps;
    st.shared_steps = row.shared_steps;
    st.solo_rate = row.solo_rate;
    st.shared_rate = row.shared_rate;
    st.shared_jobs = row.shared_jobs;
    compute_.restore(row.kind, st);
  }
  // A submission to an executor made just before memfitd died and never recorded (Slurm):
  // that run must not go on beside the next attempt. A job cancelled while its submission
  // was under way (the Slurm executor submits without the lock) may have one too, for a
  // job that must not run at all; one cancelled in the last week is asked about.
  std::set<std::string> queued_ids;
  for (const auto& j : queued) queued_ids.insert(j.id());
  for (const auto& j : cancelled) {
    if (now() - ms_of(j.finished_at()) < int64_t{7} * 24 * 3600 * 1000) queued_ids.insert(j.id());
  }
  for (const auto& [id, what] : launcher_->withdraw(queued_ids)) {
    if (auto j = store_.get(id)) record(*j, "recovered", what);
  }
  for (const auto& j : queued) {
    if (j.failure().reason() == store::kCorruptRecord) {
      fail_corrupt(j);
      continue;
    }
    if (!j.after().empty() && j.attempts() == 0) {
      waiting_[j.id()] = j.after();  // the loop's release_waiting decides (it may have ended meanwhile)
      continue;
    }
    try {
      sched_.enqueue(to_queue(j, j.plan().reserved_bytes()));
    } catch (const std::invalid_argument& e) {
      v1::Job f = j;
      f.set_state(v1::FAILED);
      f.mutable_failure()->set_kind(v1::SYSTEM);
      f.mutable_failure()->set_reason("rejected");
      f.mutable_failure()->set_message(std::string("cannot be queued again after a restart: ") + e.what());
      *f.mutable_finished_at() = ts(now());
      record(f, "state", "failed: " + f.failure().message());
    }
  }
  for (auto j : running) {
    const auto w = workers.find(j.id());
    if (j.failure().reason() == store::kCorruptRecord) {
      if (w != workers.end()) {
        bool known_device = false;  // else the stored id is another executor's (below)
        for (const auto& d : sched_.devices()) known_device = known_device || d.name == w->second.device;
        if (known_device) {
          if (auto p = launcher_->adopt(w->second.pid, w->second.events_path, w->second.events_offset)) p->kill();
        }
        store_.remove_worker(j.id());
      }
      fail_corrupt(j);
      continue;
    }
    if (w == workers.end()) {
      requeue(j, j.plan().reserved_bytes(), "recovered", "no worker on record after a restart; queued again");
      continue;
    }
    bool known_device = false;
    for (const auto& d : sched_.devices()) known_device = known_device || d.name == w->second.device;
    if (!known_device) {
      // Started on a device this memfitd does not have: the executor (local <-> slurm) or
      // the Slurm partition changed across the restart. The stored id is then a pid of the
      // other executor (or a Slurm id of another partition): never looked up as one of
      // ours, never signalled or cancelled. Failed, not queued again: the old worker may
      // still run and write to the job's output.
      store_.remove_worker(j.id());
      j.set_state(v1::FAILED);
      j.mutable_failure()->set_kind(v1::SYSTEM);
      j.mutable_failure()->set_reason("internal");
      j.mutable_failure()->set_message("was running on " + w->second.device + " (worker " +
                                       std::to_string(w->second.pid) +
                                       "), a device memfitd no longer has after a restart (executor or partition "
                                       "changed); that worker was left alone");
      *j.mutable_finished_at() = ts(now());
      record(j, "failed", j.failure().message());
      continue;
    }
    Active a;
    a.proc = launcher_->adopt(w->second.pid, w->second.events_path, w->second.events_offset);
    const bool alive = a.proc != nullptr;
    if (!alive) a.proc = launcher_->gone(w->second.events_path, w->second.events_offset);
    a.device = w->second.device;
    a.reservation = w->second.reservation_bytes;
    a.compute_kind = j.plan().compute_kind();
    sched_.adopt(j.id(), a.device, a.reservation, compute_.compute(a.compute_kind));
    if (j.state() == v1::CANCELLING) {
      a.proc->terminate();
      a.cancel_deadline_ms = now() + static_cast<int64_t>(cfg_.cancel_grace_seconds * 1000);
    }
    record(j, "adopted", alive ? "worker " + std::to_string(w->second.pid) + " found again after a restart"
                               : "the worker ended while memfitd was down");
    active_.emplace(j.id(), std::move(a));
  }
  running_ = true;
  if (run_loop) thread_ = std::thread([this] { loop(); });
}

// ---- the loop ----

void Core::loop() {
  int64_t backoff_ms = 200;
  while (running_) {
    bool failed = false;
    try {
      tick();
      if (!last_loop_error_.empty()) std::fprintf(stderr, "memfitd: scheduling loop: recovered\n");
      last_loop_error_.clear();
      backoff_ms = 200;
    } catch (const std::exception& e) {
      failed = true;
      // Logged once a minute while it repeats (a full disk must not flood the log).
      const int64_t t = now();
      if (e.what() != last_loop_error_ || t - last_loop_error_logged_ms_ >= 60000) {
        std::fprintf(stderr, "memfitd: scheduling loop: %s (retrying with backoff)\n", e.what());
        last_loop_error_ = e.what();
        last_loop_error_logged_ms_ = t;
      }
      backoff_ms = std::min<int64_t>(backoff_ms * 2, 10000);
    }
    absl::MutexLock lock(&mu_);
    if (running_) wake_.WaitWithTimeout(&mu_, absl::Milliseconds(failed ? backoff_ms : 200));
  }
}

void Core::admit_released() {
  std::vector<std::pair<std::string, std::string>> todo;
  int64_t largest = 0;
  {
    absl::MutexLock lock(&mu_);
    for (const auto& [id, after] : waiting_) todo.emplace_back(id, after);
    largest = sched_.largest_device_bytes();
  }
  for (const auto& [id, after] : todo) {
    const auto dep = store_.get(after);
    if (!dep || dep->state() != v1::SUCCEEDED) continue;
    const v1::Job j = load(id);
    if (j.state() != v1::QUEUED || j.plan().reserved_bytes() > 0) continue;
    // Admission, as at submit, outside the lock (it reads files).
    Admission a;
    std::string err;
    bool claimed = false;
    try {
      a = admit(Caller{j.owner(), false}, j.spec(), id, largest, /*for_submit=*/true);
      if (a.plan.reserved_bytes() > largest) {
        err = "the job needs " + size(a.plan.reserved_bytes()) + " but the largest device has " + size(largest);
      } else if (!a.output.in_state_dir) {
        const auto ids = run_ids(j.owner());
        ClaimOutput(a.output, id, ids.first, ids.second);
        claimed = true;
      }
    } catch (const CoreError& e) {
      err = e.what();
    } catch (const PathError& e) {
      err = e.what();
    }
    absl::MutexLock lock(&mu_);
    v1::Job cur = load(id);
    if (cur.state() != v1::QUEUED || waiting_.count(id) == 0) {  // cancelled meanwhile
      if (claimed) ReleaseOutput(a.output);
      continue;
    }
    if (!err.empty()) {
      waiting_.erase(id);
      cur.set_state(v1::FAILED);
      cur.mutable_failure()->set_kind(v1::USER_INPUT);
      cur.mutable_failure()->set_reason("after");
      cur.mutable_failure()->set_message("when job " + after + " succeeded: " + err);
      *cur.mutable_finished_at() = ts(now());
      record(cur, "failed", cur.failure().message());
      continue;
    }
    *cur.mutable_spec() = a.worker_spec;
    cur.mutable_spec()->clear_name();
    *cur.mutable_plan() = a.plan;
    record(cur, "estimated",
           "estimated peak " + size(a.plan.estimated_peak_bytes()) + ", reserving " + size(a.plan.reserved_bytes()),
           a.estimate_json);
  }
}

void Core::tick() {
  admit_released();
  std::vector<Starting> starting;
  std::exception_ptr error;  // the first store error, thrown once every placement is committed
  {
    absl::MutexLock lock(&mu_);
    starting = tick_locked(&error);
    // fork + exec is quick: local workers start under the lock.
    if (cfg_.executor != "slurm") {
      for (auto& st : starting) {
        std::string why;
        auto proc = launch(st, &why);
        commit_start(st, std::move(proc), why, &error);
      }
      starting.clear();
    }
  }
  // sbatch waits on slurmctld (up to its 30 s limit), so the Slurm executor submits
  // without the lock: submit, cancel, watch, devices and /metrics go on meanwhile. The
  // placements stay reserved in the scheduler; each is committed as soon as its sbatch
  // answers (its Slurm id recorded, or a cancel meanwhile acted on: commit_start
  // withdraws the submission); a restart before that withdraws it too (the job is still
  // queued and its submission unrecorded). Up to slurm.parallel_submissions sbatch run at
  // once, so a burst of placements waits on the controller once per that many jobs. The
  // helper threads end before tick returns: only tick places jobs, so nothing else starts
  // these.
  if (!starting.empty()) submit_all(starting, &error);
  if (error) std::rethrow_exception(error);
}

void Core::submit_all(std::vector<Starting>& starting, std::exception_ptr* error) {
  // Placements are taken in the scheduler's order (each sbatch begins in that order; they
  // may answer in another).
  std::atomic<size_t> next{0};
  auto submit = [&] {
    for (size_t i = next++; i < starting.size(); i = next++) {
      try {
        std::string why;
        auto proc = launch(starting[i], &why);
        absl::MutexLock lock(&mu_);
        commit_start(starting[i], std::move(proc), why, error);  // *error only under mu_
      } catch (...) {
        // Out of memory (launch and commit_start catch the rest): kept for tick to throw,
        // never out of a thread (that would end memfitd).
        absl::MutexLock lock(&mu_);
        if (!*error) *error = std::current_exception();
      }
    }
  };
  const size_t threads =
      std::min(starting.size(), static_cast<size_t>(std::max(1, cfg_.slurm.parallel_submissions)));
  std::vector<std::thread> helpers;
  helpers.reserve(threads);
  for (size_t t = 1; t < threads; ++t) {
    try {
      helpers.emplace_back(submit);
    } catch (const std::system_error& e) {
      // No thread to be had (a process limit): fewer submissions at once, none lost.
      std::fprintf(stderr, "memfitd: fewer sbatch at once than slurm.parallel_submissions (no thread: %s)\n", e.what());
      break;
    }
  }
  submit();  // catches everything: the helpers are always joined
  for (auto& t : helpers) t.join();
}

std::unique_ptr<Worker> Core::launch(const Starting& st, std::string* error) {
  try {
    return launcher_->start(st.launch);
  } catch (const std::exception& e) {
    *error = e.what();
    return nullptr;
  }
}

std::vector<Core::Starting> Core::tick_locked(std::exception_ptr* error) {
  std::vector<std::string> ended;
  for (auto& [id, a] : active_) {
    poll(id, a);
    if (a.cancel_deadline_ms > 0 && now() >= a.cancel_deadline_ms) {
      a.proc->kill();
      a.cancel_deadline_ms = 0;
    }
    if (a.proc->exited()) {
      drain(id, a);  // lines written just before the exit
      ended.push_back(id);
    } else if (const std::string note = a.proc->status_change(); !note.empty()) {
      v1::Job j = load(id);
      record(j, "executor", note);
    }
  }
  // Device memory for the peak between scrapes, before the ended attempts are let go.
  for (const auto& d : devices_.devices()) device_peaks_.observe(d.name, device_sample(d));
  for (const auto& id : ended) {
    finish(id, active_.at(id));
    active_.erase(id);
  }
  release_waiting();
  for (auto it = held_.begin(); it != held_.end();) {
    if (now() < it->second) {
      ++it;
      continue;
    }
    v1::Job j = load(it->first);
    it = held_.erase(it);
    if (j.state() == v1::QUEUED) sched_.enqueue(to_queue(j, j.plan().reserved_bytes()));
  }
  std::vector<Starting> starting;
  if (cfg_.paused) return starting;
  for (const auto& p : sched_.schedule(now())) {
    try {
      if (auto st = prepare_start(p)) starting.push_back(std::move(*st));
    } catch (...) {
      // The store failed (a full disk): the jobs prepared before it still start; this one
      // gives its place back and is queued again once its record reads as queued.
      sched_.release(p.job_id);
      held_[p.job_id] = now() + 1000;
      if (!*error) *error = std::current_exception();
    }
  }
  return starting;
}

int64_t Core::device_sample(const DeviceInfo& d) {
  const int64_t used = d.kind == "cuda" ? devices_.used_bytes(d.name) : -1;
  if (used >= 0) return used;
  int64_t sum = 0;
  for (const auto& [id, a] : active_) {
    if (a.device == d.name) sum += std::max(a.report.reported_peak, a.report.memory_bytes);
  }
  return sum;
}

void Core::release_waiting() {
  for (auto it = waiting_.begin(); it != waiting_.end();) {
    const AfterDecision d = DecideAfter(it->second, store_.get(it->second));
    if (d.action == AfterDecision::Action::kWait) {
      ++it;
      continue;
    }
    v1::Job j = load(it->first);
    if (d.action == AfterDecision::Action::kRelease && j.state() == v1::QUEUED && j.plan().reserved_bytes() == 0) {
      ++it;  // not admitted yet (its inputs came with that job): admit_released, next tick
      continue;
    }
    it = waiting_.erase(it);
    if (j.state() != v1::QUEUED) continue;  // cancelled meanwhile
    if (d.action == AfterDecision::Action::kRelease) {
      record(j, "after", d.message);
      try {
        sched_.enqueue(to_queue(j, j.plan().reserved_bytes()));
      } catch (const std::invalid_argument& e) {
        j.set_state(v1::FAILED);
        j.mutable_failure()->set_kind(v1::SYSTEM);
        j.mutable_failure()->set_reason("rejected");
        j.mutable_failure()->set_message(std::string("cannot be queued: ") + e.what());
        *j.mutable_finished_at() = ts(now());
        record(j, "state", "failed: " + j.failure().message());
      }
    } else {
      // Cancelled, the reason in its failure (kind: the user's chain of jobs).
      j.set_state(v1::CANCELLED);
      j.mutable_failure()->set_kind(v1::USER_INPUT);
      j.mutable_failure()->set_reason("after");
      j.mutable_failure()->set_message(d.message);
      *j.mutable_finished_at() = ts(now());
      record(j, "state", "cancelled: " + d.message);
    }
  }
}

WorkerLaunch Core::launch_of(const v1::Job& j, const sched::Placement& p, const OutputPlace& out) {
  const std::string dir = rules_.jobs_dir + "/" + j.id();
  const DeviceInfo* dev = nullptr;
  for (const auto& d : devices_.devices()) {
    if (d.name == p.device) dev = &d;
  }
  WorkerLaunch l;
  l.binary = cfg_.worker;
  l.dir = dir;
  l.job_id = j.id();
  l.args = {"run", "--spec", dir + "/spec.json", "--job-id", j.id()};
  // Where the worker may read and write: the owner's read roots; the output folder
  // beneath its root (links never followed).
  for (const auto& r : ExpandRoots(cfg_.read_roots, j.owner())) l.args.insert(l.args.end(), {"--input-root", r});
  if (cfg_.read_roots.empty()) l.args.insert(l.args.end(), {"--input-root", dir + "/no-inputs"});
  l.args.insert(l.args.end(), {"--output-root", out.root});
  l.reservation_bytes = p.reservation_bytes;
  const auto ids = run_ids(j.owner());
  l.confine.uid = ids.first;
  l.confine.gid = ids.second;
  if (cfg_.executor == "slurm") {
    // Slurm picks the node and the GPU (CUDA_VISIBLE_DEVICES names the one its shards are on).
    if (cfg_.slurm.device == "cuda") {
      l.args.insert(l.args.end(), {"--device", "cuda:0"});
      l.env.push_back("CUDA_DEVICE_ORDER=PCI_BUS_ID");
    } else {
      l.args.insert(l.args.end(), {"--device", "cpu", "--memory-limit", std::to_string(p.reservation_bytes), "--threads",
                                   std::to_string(device_model().threads)});
      l.confine.memory_limit_bytes = p.reservation_bytes + cfg_.worker_memory_allowance;  // sbatch --mem
    }
    return l;
  }
  if (dev != nullptr && dev->kind == "cuda") {
    l.args.insert(l.args.end(), {"--device", "cuda:0"});
    // NVML numbers GPUs in PCI bus order; CUDA, by default, fastest first.
    l.env.push_back("CUDA_DEVICE_ORDER=PCI_BUS_ID");
    l.env.push_back("CUDA_VISIBLE_DEVICES=" + std::to_string(dev->index));
  } else {
    l.args.insert(l.args.end(), {"--device", "cpu", "--memory-limit", std::to_string(p.reservation_bytes), "--threads",
                                 std::to_string(device_model().threads)});
  }
  // The kernel's limit: the reservation plus the allowance for code, libraries and data.
  // On a GPU the reservation is device memory: host memory gets the allowance alone, and
  // only through a cgroup (RLIMIT_DATA would also count the CUDA driver's mappings).
  const bool cuda = dev != nullptr && dev->kind == "cuda";
  l.confine.memory_limit_bytes = cuda ? (cfg_.worker_cgroup.empty() ? 0 : cfg_.worker_memory_allowance)
                                      : p.reservation_bytes + cfg_.worker_memory_allowance;
  l.confine.cgroup_dir = cfg_.worker_cgroup;
  return l;
}

sched::QueuedJob Core::to_queue(const v1::Job& j, int64_t reservation) {
  return {j.id(), j.owner(), j.priority(), ms_of(j.created_at()), reservation, compute_.compute(j.plan().compute_kind())};
}

std::optional<Core::Starting> Core::prepare_start(const sched::Placement& p) {
  v1::Job j = load(p.job_id);
  if (j.state() != v1::QUEUED) {
    // Cancelled (or ended) after it was queued: nothing to start.
    sched_.release(j.id());
    return std::nullopt;
  }
  Starting s;
  s.placement = p;
  s.queued_ms = now() - ms_of(j.created_at());
  j.set_attempts(j.attempts() + 1);
  j.set_device(p.device);
  j.mutable_plan()->set_reserved_bytes(p.reservation_bytes);
  try {
    fsx::Dir jobs = fsx::Dir::open_below(rules_.jobs_dir, rules_.jobs_dir, true);
    jobs.mkdirs(j.id());
    ::fchmodat(jobs.fd(), j.id().c_str(), 0711, 0);
    v1::JobSpec spec = j.spec();
    spec.set_name(j.name());
    std::string spec_json;
    google::protobuf::util::JsonPrintOptions o;
    o.preserve_proto_field_names = true;
    (void)google::protobuf::util::MessageToJsonString(spec, &spec_json, o);
    const fsx::Dir jd = jobs.sub(j.id(), false);
    jd.write_file_atomic("spec.json", spec_json);
    ::fchmodat(jd.fd(), "spec.json", 0644, 0);
    // Where it writes: its own folder (made and claimed at its first start), or the folder
    // claimed at submit, beneath its write root.
    const OutputPlace own = DecideOutput(rules_, j.owner(), j.id(), "");
    const bool in_own = j.spec().output_dir() == own.dir;
    const OutputPlace out = in_own ? own : DecideOutput(rules_, j.owner(), j.id(), j.spec().output_dir());
    if (in_own && !jd.exists(std::string("output/") + kOutputMarker)) {
      const auto ids = run_ids(j.owner());
      ClaimOutput(out, j.id(), ids.first, ids.second);
    }
    s.launch = launch_of(j, p, out);
  } catch (const std::exception& e) {
    start_failed(j, e.what());
    return std::nullopt;
  }
  s.job = std::move(j);
  submitting_.insert(p.job_id);
  return s;
}

void Core::commit_start(Starting& s, std::unique_ptr<Worker> proc, const std::string& error,
                        std::exception_ptr* store_error) {
  const std::string id = s.placement.job_id;
  submitting_.erase(id);
  try {
    commit_placed(s, proc, error);
  } catch (...) {
    // The store failed: nothing may run that memfitd does not track. What was started is
    // stopped, the place given back, and the job queued again once its record reads as
    // queued (a cancelled one stays cancelled).
    if (proc) proc->kill();
    sched_.release(id);
    held_[id] = now() + 1000;
    if (!*store_error) *store_error = std::current_exception();
  }
}

void Core::commit_placed(Starting& s, std::unique_ptr<Worker>& proc, const std::string& error) {
  const sched::Placement& p = s.placement;
  // What the attempt changes, applied to the record as it is now: a cancel may have come
  // while the executor was asked (the Slurm executor asks without the lock).
  v1::Job j = load(p.job_id);
  if (j.state() != v1::QUEUED) {
    sched_.release(j.id());
    if (proc) {
      proc->kill();
      record(j, "executor",
             "withdrew worker " + std::to_string(proc->pid()) + ", submitted while the job was cancelled");
    } else if (!error.empty()) {
      record(j, "executor", "the submission made while the job was cancelled failed: " + error);
    }
    proc.reset();
    return;
  }
  j.set_attempts(s.job.attempts());
  j.set_device(s.job.device());
  j.mutable_plan()->set_reserved_bytes(s.job.plan().reserved_bytes());
  if (!proc) {
    start_failed(j, error);
    return;
  }
  store_.put_worker({j.id(), proc->pid(), p.device, p.reservation_bytes, proc->out_path(), proc->offset(),
                     j.attempts()});
  j.set_state(v1::RUNNING);
  if (!j.has_started_at()) *j.mutable_started_at() = ts(now());
  if (cfg_.executor == "slurm") {
    record(j, "placed",
           "submitted to Slurm as job " + std::to_string(proc->pid()) + " (partition " + cfg_.slurm.partition +
               ", shard:" + std::to_string(ShardsFor(p.reservation_bytes, cfg_.slurm)) + ") with " +
               size(p.reservation_bytes) + " reserved (attempt " + std::to_string(j.attempts()) + ")");
  } else {
    record(j, "placed",
           "running on " + p.device + " with " + size(p.reservation_bytes) + " reserved (attempt " +
               std::to_string(j.attempts()) + ", worker " + std::to_string(proc->pid()) + ")");
  }
  Active a;
  a.proc = std::move(proc);
  a.device = p.device;
  a.reservation = p.reservation_bytes;
  a.compute_kind = j.plan().compute_kind();
  active_.emplace(j.id(), std::move(a));
  new_placements_.push_back(static_cast<double>(s.queued_ms) / 1000.0);
}

void Core::start_failed(v1::Job& j, const std::string& why) {
  sched_.release(j.id());
  // Slurm refused the submission: often a controller restarting or unreachable. The job
  // goes back to the queue after a back-off (30 s, 60 s, ...) on its crash budget.
  if (cfg_.executor == "slurm" && j.crash_retries() < cfg_.crash_retries) {
    j.set_crash_retries(j.crash_retries() + 1);
    j.set_state(v1::QUEUED);
    j.set_device("");
    const int64_t wait_ms = int64_t{30000} * j.crash_retries();
    held_[j.id()] = now() + wait_ms;
    record(j, "requeued",
           why + "; trying again in " + std::to_string(wait_ms / 1000) + " s (retry " +
               std::to_string(j.crash_retries()) + " of " + std::to_string(cfg_.crash_retries) + ")");
    return;
  }
  // memfitd could not start it (job folder, worker binary, cgroup): the system's fault.
  j.set_state(v1::FAILED);
  j.mutable_failure()->set_kind(v1::SYSTEM);
  j.mutable_failure()->set_reason("internal");
  j.mutable_failure()->set_message("memfitd could not start the worker: " + why);
  *j.mutable_finished_at() = ts(now());
  record(j, "failed", j.failure().message());
}

void Core::drain(const std::string& id, Active& a) {
  // Until a read consumes nothing (one may consume only lines that are not events).
  for (int k = 0; k < 32; ++k) {
    const int64_t before = a.proc->offset();
    poll(id, a);
    if (a.proc->offset() == before) break;
  }
}

void Core::poll(const std::string& id, Active& a) {
  const int64_t before = a.proc->offset();
  const auto lines = a.proc->read_lines();
  if (lines.empty()) {
    if (a.proc->offset() != before) store_.set_worker_offset(id, a.proc->offset());
    return;
  }
  v1::Job j = load(id);
  bool unsaved = false;  // progress from events not stored
  for (const auto& line : lines) {
    const int64_t steps_before = a.report.steps;
    const auto r = ApplyWorkerLine(line, j, a.report);
    if (r && TakeEvent(a.events, r->kind, now())) {
      record(j, r->kind, r->message, line.size() <= EventBudget::kMaxEventData ? line : std::string());
      unsaved = false;
    } else if (r) {
      unsaved = true;
      if (a.events.dropped == 1) {
        record(j, "events", "the worker reports events faster than memfitd stores them: from now on " +
                                std::to_string(static_cast<int>(EventBudget::kPerSecond)) +
                                " a second are kept (progress follows every one)");
        unsaved = false;
      }
    }
    // A step's throughput, alone or beside others on its device, teaches the compute model
    // (the attempt's first step, with its warm-up, does not count).
    // Not with the Slurm executor: its one device is the whole partition, so every job
    // beside another on the cluster would count as sharing a GPU with it.
    if (a.report.steps > steps_before && a.report.steps > 1 && !a.compute_kind.empty() && cfg_.executor != "slurm") {
      const v1::Progress& pr = j.progress();
      const double rate = pr.tokens_per_second() > 0 ? pr.tokens_per_second() : pr.samples_per_second();
      compute_.observe(a.compute_kind, rate, static_cast<int>(sched_.jobs_on(a.device).size()));
      sched_.set_compute(id, compute_.compute(a.compute_kind));
    }
  }
  if (unsaved) store_.update_job(j);
  store_.set_worker_offset(id, a.proc->offset());
}

void Core::requeue(v1::Job& j, int64_t reservation, const std::string& kind, const std::string& why) {
  j.set_state(v1::QUEUED);
  j.set_device("");
  j.mutable_plan()->set_reserved_bytes(reservation);
  record(j, kind, why);
  sched_.enqueue(to_queue(j, reservation));
}

void Core::finish(const std::string& id, Active& a) {
  sched_.release(id);
  store_.remove_worker(id);
  // What this attempt taught the compute model outlives memfitd (kept per kind, the most
  // recently written kMaxKinds).
  if (const auto st = a.compute_kind.empty() ? std::nullopt : compute_.stats(a.compute_kind)) {
    store_.put_compute_kind({a.compute_kind, st->solo_steps, st->shared_steps, st->solo_rate, st->shared_rate,
                             st->shared_jobs, now()},
                            static_cast<int>(sched::ComputeModel::kMaxKinds));
  }
  v1::Job j = load(id);
  if (j.failure().reason() == store::kCorruptRecord) {
    // Its record stopped parsing while it ran: a stub without spec, plan or submit time
    // must not be queued again (it would look starved at once and drain a device).
    fail_corrupt(j);
    return;
  }
  const std::string key = j.plan().calibration_key();
  const int64_t est = j.plan().estimated_peak_bytes();
  Outcome o;
  o.daemon_stopping = a.stopping;
  const AttemptReport& r = a.report;
  if (r.terminal == "finished") {
    o.ended = Outcome::Ended::kFinished;
  } else if (r.terminal == "failed") {
    o.ended = Outcome::Ended::kFailed;
    o.reason = r.fail_reason;
    o.message = r.fail_message;
  } else if (r.terminal == "stopped") {
    o.ended = Outcome::Ended::kStopped;
  } else {
    o.ended = Outcome::Ended::kNoResult;
    o.exit_code = a.proc->exit_code();
    o.signal = a.proc->exit_signal();
  }
  const JobFacts facts{j.state(), j.oom_retries(), j.crash_retries(), a.reservation, sched_.largest_device_bytes()};
  const Decision d = Decide(facts, o, policy_, retry_);
  if (d.oom_lower_bound && !key.empty() && est > 0) {
    // The job needed more than its reservation: a lower bound on its peak.
    calibration_.add({key, est, a.reservation + 1});
    store_.add_calibration({key, est, a.reservation + 1, now()});
  }
  switch (d.action) {
    case Decision::Action::kSucceed: {
      j.set_state(v1::SUCCEEDED);
      *j.mutable_finished_at() = ts(now());
      record(j, d.event_kind, d.message);
      // Learn from the measured peak (like against like: on CUDA the caching allocator's
      // reserved bytes plus the context the estimate counts). Only a run that trained
      // measured the whole step (a resume at the last step did not).
      const estimator::DeviceModel dm = device_model();
      const bool cuda = dm.kind == estimator::DeviceModel::Kind::kCUDA;
      const int64_t measured = cuda ? r.measured_reserved + dm.context_bytes : r.measured_peak;
      if (est > 0 && measured > 0 && r.steps > 0) {
        if (!key.empty()) {
          calibration_.add({key, est, measured});
          store_.add_calibration({key, est, measured, now()});
        }
        new_ratios_.push_back(static_cast<double>(measured) / static_cast<double>(est));
      }
      return;
    }
    case Decision::Action::kCancel:
      j.set_state(v1::CANCELLED);
      *j.mutable_finished_at() = ts(now());
      record(j, d.event_kind, d.message);
      return;
    case Decision::Action::kRequeue:
      if (d.used_oom_retry) {
        j.set_oom_retries(j.oom_retries() + 1);
        ++oom_retries_total_;
      }
      if (d.used_crash_retry) j.set_crash_retries(j.crash_retries() + 1);
      requeue(j, d.reservation_bytes, d.event_kind, d.message);
      return;
    case Decision::Action::kFail:
      j.set_state(v1::FAILED);
      j.mutable_failure()->set_kind(d.failure_kind);
      j.mutable_failure()->set_reason(d.reason);
      j.mutable_failure()->set_message(d.message);
      *j.mutable_finished_at() = ts(now());
      record(j, d.event_kind, "failed: " + d.message);
      return;
  }
}

void Core::stop(bool graceful) {
  if (!running_.exchange(false)) {
    if (thread_.joinable()) thread_.join();
    return;
  }
  {
    absl::MutexLock lock(&mu_);
    wake_.SignalAll();
  }
  if (thread_.joinable()) thread_.join();
  if (!graceful) return;
  mu_.Lock();
  for (auto& [id, a] : active_) {
    a.stopping = true;
    a.proc->terminate();
  }
  const int64_t deadline = now() + static_cast<int64_t>(cfg_.cancel_grace_seconds * 1000);
  while (!active_.empty()) {
    std::vector<std::string> ended;
    for (auto& [id, a] : active_) {
      poll(id, a);
      if (now() >= deadline) a.proc->kill();
      if (a.proc->exited()) {
        drain(id, a);
        ended.push_back(id);
      }
    }
    for (const auto& id : ended) {
      finish(id, active_.at(id));
      active_.erase(id);
    }
    if (!active_.empty()) {
      mu_.Unlock();
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      mu_.Lock();
    }
  }
  mu_.Unlock();
}

}  // namespace memfit::daemon
