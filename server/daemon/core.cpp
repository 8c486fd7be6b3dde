#include "core.h"

#include <google/protobuf/util/json_util.h>
#include <google/protobuf/util/time_util.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <thread>

#include "fit.h"
#include "model_config.h"
#include "report.h"
#include "spec.h"

namespace memfit::daemon {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using google::protobuf::util::TimeUtil;

bool terminal(v1::JobState s) { return s == v1::SUCCEEDED || s == v1::FAILED || s == v1::CANCELLED; }

google::protobuf::Timestamp ts(int64_t ms) { return TimeUtil::MillisecondsToTimestamp(ms); }

int64_t ms_of(const google::protobuf::Timestamp& t) { return TimeUtil::TimestampToMilliseconds(t); }

std::vector<sched::Device> sched_devices(const DeviceMonitor& d) {
  std::vector<sched::Device> out;
  for (const auto& x : d.devices()) out.push_back({x.name, x.total_bytes});
  return out;
}

// Every path a spec may name, with its field name, for the absolute-path and allowed-root
// checks.
std::vector<std::pair<std::string, std::string*>> paths_of(v1::JobSpec& s) {
  return {{"model.config_path", s.mutable_model()->mutable_config_path()},
          {"model.weights_path", s.mutable_model()->mutable_weights_path()},
          {"data.train_path", s.mutable_data()->mutable_train_path()},
          {"data.validation_path", s.mutable_data()->mutable_validation_path()},
          {"data.tokenizer_path", s.mutable_data()->mutable_tokenizer_path()},
          {"data.train_labels_path", s.mutable_data()->mutable_train_labels_path()},
          {"data.validation_labels_path", s.mutable_data()->mutable_validation_labels_path()},
          {"output_dir", s.mutable_output_dir()}};
}

v1::MemorySpec memory_spec(const spec::Memory& m) {
  v1::MemorySpec s;
  s.set_activation(m.approx_activation ? "approx" : "exact");
  s.set_norm(m.memory_sharing_norm ? "memory_sharing" : "exact");
  s.set_fused_mlp(m.fused_mlp);
  s.set_attention(m.efficient_attention ? "memory_efficient" : "standard");
  s.set_activation_checkpointing(m.checkpointing);
  s.set_fused_loss(m.fused_loss);
  if (!m.preset.empty()) s.set_preset(m.preset);
  return s;
}

std::string size(int64_t b) { return estimator::format_size(b); }

}  // namespace

Core::Core(Config cfg, store::Store& store, DeviceMonitor& devices, Clock clock)
    : cfg_(std::move(cfg)),
      store_(store),
      devices_(devices),
      clock_(clock ? std::move(clock)
                   : Clock([] {
                       return std::chrono::duration_cast<std::chrono::milliseconds>(
                                  std::chrono::system_clock::now().time_since_epoch())
                           .count();
                     })),
      sched_(sched_devices(devices), sched::Options{static_cast<int64_t>(cfg_.starvation_minutes * 60000.0)}) {
  policy_.margin = cfg_.margin;
  policy_.oom_growth = cfg_.oom_growth;
  policy_.max_oom_retries = cfg_.oom_retries;
  std::random_device rd;
  seq_ = (static_cast<uint64_t>(rd()) << 8) % 1000000;
}

Core::~Core() { stop(false); }

estimator::DeviceModel Core::device_model() const {
  const auto& d = devices_.devices();
  const bool cuda = !d.empty() && d.front().kind == "cuda";
  if (cuda) return estimator::DeviceModel::cuda();
  int threads = cfg_.worker_threads;
  if (threads <= 0) {
    const int cores = static_cast<int>(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)));
    threads = std::max(1, cores / std::max<int>(1, static_cast<int>(d.size())));
  }
  return estimator::DeviceModel::cpu(threads);
}

// ---- admission ----

Core::Admission Core::admit(const v1::JobSpec& spec_in, const std::string& job_id, int64_t device_bytes) {
  Admission a;
  v1::JobSpec s = spec_in;
  const bool auto_memory = s.memory().preset() == "auto";
  if (auto_memory) s.mutable_memory()->set_preset("");
  if (s.output_dir().empty()) s.set_output_dir((fs::path(cfg_.state_dir) / "jobs" / job_id / "output").string());
  for (auto& [field, p] : paths_of(s)) {
    if (p->empty()) continue;
    if (p->front() != '/') throw CoreError(Code::kInvalidArgument, field + ": memfitd needs an absolute path, got '" + *p + "'");
    const std::string canon = fs::weakly_canonical(*p).string();
    if (!cfg_.allowed_roots.empty()) {
      const bool ok = std::any_of(cfg_.allowed_roots.begin(), cfg_.allowed_roots.end(), [&](const std::string& r) {
        return canon == r || canon.rfind(r + "/", 0) == 0;
      });
      if (!ok) throw CoreError(Code::kPermissionDenied, field + ": " + *p + " is outside the allowed roots");
    }
  }
  spec::Job job;
  model::ModelConfig cfg;
  try {
    job = spec::resolve(s, "spec", "/");
    cfg = model::load_config(job.config_path, job.architecture);
  } catch (const spec::SpecError& e) {
    throw CoreError(Code::kInvalidArgument, e.what());
  } catch (const model::ConfigError& e) {
    throw CoreError(Code::kInvalidArgument, e.what());
  }
  estimator::Input in;
  in.job = job;
  in.config = cfg;
  in.device = device_model();
  in.validation = !job.validation_path.empty();
  in.load_weights = !job.weights_path.empty();
  a.input = in;
  try {
    a.estimate = estimator::estimate(in);
    if (auto_memory) {
      const estimator::FitPlan plan = estimator::fit(in, device_bytes);
      a.plan.set_level(plan.fits ? plan.level : "none");
      for (const auto& r : plan.reasons) a.plan.add_reasons(r);
      if (plan.fits) {
        in.job.memory = plan.memory;
        in.job.training.micro_batch = plan.micro_batch;
        in.job.training.gradient_accumulation = plan.gradient_accumulation;
        a.estimate = estimator::estimate(in);
        *s.mutable_memory() = memory_spec(plan.memory);
        s.mutable_training()->set_micro_batch(plan.micro_batch);
        s.mutable_training()->set_gradient_accumulation(plan.gradient_accumulation);
      }
    }
  } catch (const estimator::EstimateError& e) {
    throw CoreError(Code::kInvalidArgument, e.what());
  }
  // What memfit's ops save: the same job with the stock ops (checkpointing as asked).
  try {
    estimator::Input stock = in;
    stock.job.memory = spec::Memory{};
    stock.job.memory.efficient_attention = false;
    stock.job.memory.checkpointing = in.job.memory.checkpointing;
    a.plan.set_exact_activation_bytes(estimator::estimate(stock).activation_bytes);
  } catch (const estimator::EstimateError&) {
    a.plan.set_exact_activation_bytes(a.estimate.activation_bytes);
  }
  a.plan.set_activation_bytes(a.estimate.activation_bytes);
  a.key = estimator::Calibration::key_of(in);
  int64_t calibrated = 0;
  {
    std::lock_guard<std::mutex> lock(mu_);
    calibrated = calibration_.apply(a.key, a.estimate.peak_bytes);
  }
  a.plan.set_calibration_key(a.key);
  a.plan.set_estimated_peak_bytes(a.estimate.peak_bytes);
  a.plan.set_calibrated_peak_bytes(calibrated);
  a.plan.set_reserved_bytes(policy_.reserve(calibrated));
  if (!s.resources().memory().empty()) {
    try {
      const int64_t declared = estimator::parse_size(s.resources().memory(), "resources.memory");
      if (declared <= 0) throw CoreError(Code::kInvalidArgument, "resources.memory: must be more than 0");
      a.plan.set_reserved_bytes(declared);
      a.plan.add_reasons("resources.memory: " + size(declared) + " reserved as declared (the estimate with margin is " +
                         size(policy_.reserve(calibrated)) + ")");
    } catch (const estimator::EstimateError& e) {
      throw CoreError(Code::kInvalidArgument, e.what());
    }
  }
  a.plan.set_micro_batch(in.job.training.micro_batch);
  a.plan.set_gradient_accumulation(in.job.training.gradient_accumulation);
  *a.plan.mutable_memory() = memory_spec(in.job.memory);
  a.worker_spec = s;
  a.estimate_json = estimator::to_json(a.estimate).dump();
  return a;
}

v1::Job Core::submit(const Caller& c, const v1::SubmitJobRequest& r) {
  if (!r.request_id().empty()) {
    if (auto j = store_.find_by_request(c.user, r.request_id())) return *j;
  }
  char id[48];
  {
    std::lock_guard<std::mutex> lock(mu_);
    std::snprintf(id, sizeof id, "j%013lld-%06llu", static_cast<long long>(now()),
                  static_cast<unsigned long long>(seq_++ % 1000000));
  }
  const Admission a = admit(r.spec(), id, sched_.largest_device_bytes());
  if (!sched_.fits_alone(a.plan.reserved_bytes())) {
    std::string msg = "the job needs " + size(a.plan.reserved_bytes()) + " (estimated peak " +
                      size(a.plan.estimated_peak_bytes()) + " + " + std::to_string(static_cast<int>(cfg_.margin * 100)) +
                      "% margin) but the largest device has " + size(sched_.largest_device_bytes());
    if (r.spec().memory().preset() != "auto") msg += "; memory.preset: auto lets memfitd pick options that fit";
    throw CoreError(Code::kFailedPrecondition, msg);
  }
  v1::Job j;
  j.set_id(id);
  j.set_owner(c.user);
  j.set_name(r.spec().name());
  j.set_state(v1::QUEUED);
  *j.mutable_spec() = a.worker_spec;
  j.set_priority(r.priority());
  *j.mutable_created_at() = ts(now());
  *j.mutable_plan() = a.plan;
  j.set_request_id(r.request_id());
  const std::string msg = "queued: estimated peak " + size(a.plan.estimated_peak_bytes()) + ", reserving " +
                          size(a.plan.reserved_bytes());
  try {
    // The limit is checked in the insert's transaction: concurrent submits cannot pass it.
    if (!store_.insert_job(j, event("submitted", v1::QUEUED, msg, a.estimate_json), cfg_.max_queued_per_user)) {
      throw CoreError(Code::kResourceExhausted, "user " + c.user + " already has " +
                                                    std::to_string(cfg_.max_queued_per_user) +
                                                    " queued jobs (limits.max_queued_per_user)");
    }
  } catch (const store::StoreError&) {
    if (!r.request_id().empty()) {
      if (auto prev = store_.find_by_request(c.user, r.request_id())) return *prev;  // a concurrent twin won
    }
    throw;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    sched_.enqueue({j.id(), j.owner(), j.priority(), ms_of(j.created_at()), a.plan.reserved_bytes()});
  }
  wake_.notify_all();
  events_cv_.notify_all();
  return j;
}

// ---- views ----

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
    std::unique_lock<std::mutex> lock(mu_);
    events_cv_.wait_for(lock, std::chrono::milliseconds(wait_ms));
    lock.unlock();
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
  const fs::path path = fs::path(cfg_.state_dir) / "jobs" / r.id() / (stream == "stdout" ? "worker.out" : "worker.err");
  v1::ReadJobLogResponse out;
  std::ifstream f(path, std::ios::binary);
  if (!f) {
    out.set_next_offset(r.offset());
    return out;  // not started yet
  }
  f.seekg(0, std::ios::end);
  const int64_t size = static_cast<int64_t>(f.tellg());
  out.set_size(size);
  const int64_t from = std::min(r.offset(), size);
  const int64_t n = std::min(limit, size - from);
  std::string data(static_cast<size_t>(n), '\0');
  f.seekg(from);
  f.read(data.data(), n);
  data.resize(static_cast<size_t>(f.gcount()));
  out.set_next_offset(from + static_cast<int64_t>(data.size()));
  out.set_data(std::move(data));
  return out;
}

v1::ListDevicesResponse Core::devices() {
  std::lock_guard<std::mutex> lock(mu_);
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
  }
  return out;
}

v1::EstimateJobResponse Core::estimate(const Caller&, const v1::EstimateJobRequest& r) {
  const int64_t dev = r.device_bytes() > 0 ? r.device_bytes() : sched_.largest_device_bytes();
  const Admission a = admit(r.spec(), "estimate", dev);
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
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& d : devices_.devices()) {
      s.devices.push_back({d.name, d.kind, d.total_bytes, sched_.reserved_bytes(d.name), devices_.used_bytes(d.name)});
    }
    s.queue_length = static_cast<int64_t>(sched_.queue_length());
    s.oom_retries_total = oom_retries_total_;
    s.estimate_ratios.swap(new_ratios_);
    s.placement_seconds.swap(new_placements_);
  }
  for (int st : {v1::QUEUED, v1::RUNNING, v1::CANCELLING, v1::SUCCEEDED, v1::FAILED, v1::CANCELLED}) {
    s.jobs_by_state[st] = store_.count(static_cast<v1::JobState>(st));
  }
  std::map<std::string, int64_t> cpu_used;
  for (const auto& j : store_.in_states({v1::RUNNING, v1::CANCELLING})) {
    JobGauge g;
    g.id = j.id();
    g.owner = j.owner();
    g.device = j.device();
    g.estimated = j.plan().estimated_peak_bytes();
    g.reserved = j.plan().reserved_bytes();
    g.measured_peak = j.progress().peak_memory_bytes();
    g.activation_bytes = j.progress().activation_bytes() > 0 ? j.progress().activation_bytes() : j.plan().activation_bytes();
    g.activation_saved = std::max<int64_t>(0, j.plan().exact_activation_bytes() - j.plan().activation_bytes());
    g.step = j.progress().step();
    g.total_steps = j.progress().total_steps();
    g.loss = j.progress().loss();
    cpu_used[j.device()] += j.progress().memory_bytes();
    s.jobs.push_back(g);
  }
  for (auto& d : s.devices) {
    if (d.used < 0) d.used = cpu_used[d.name];
  }
  return s;
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
  events_cv_.notify_all();
}

// ---- the loop ----

void Core::start() {
  // Calibration from finished jobs.
  for (const auto& row : store_.calibration(static_cast<int>(estimator::Calibration::kWindow))) {
    try {
      calibration_.add({row.key, row.estimated_bytes, row.measured_bytes});
    } catch (const estimator::EstimateError&) {
    }
  }
  std::map<std::string, store::WorkerRecord> workers;
  for (const auto& w : store_.workers()) workers[w.job_id] = w;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& j : store_.in_states({v1::QUEUED})) {
      sched_.enqueue({j.id(), j.owner(), j.priority(), ms_of(j.created_at()), j.plan().reserved_bytes()});
    }
  }
  for (auto j : store_.in_states({v1::RUNNING, v1::CANCELLING})) {
    const auto w = workers.find(j.id());
    std::lock_guard<std::mutex> lock(mu_);
    if (w == workers.end()) {
      requeue(j, j.plan().reserved_bytes(), "recovered", "no worker on record after a restart; queued again");
      continue;
    }
    Active a;
    auto proc = WorkerProcess::adopt(w->second.pid, w->second.events_path, w->second.events_offset);
    a.proc = proc ? *proc : WorkerProcess::gone(w->second.events_path, w->second.events_offset);
    a.device = w->second.device;
    a.reservation = w->second.reservation_bytes;
    sched_.adopt(j.id(), a.device, a.reservation);
    if (j.state() == v1::CANCELLING) {
      a.proc.terminate();
      a.cancel_deadline_ms = now() + static_cast<int64_t>(cfg_.cancel_grace_seconds * 1000);
    }
    record(j, "adopted", proc ? "worker " + std::to_string(w->second.pid) + " found again after a restart"
                              : "the worker ended while memfitd was down");
    active_.emplace(j.id(), std::move(a));
  }
  running_ = true;
  thread_ = std::thread([this] { loop(); });
}

void Core::loop() {
  while (running_) {
    try {
      tick();
    } catch (const std::exception& e) {
      std::fprintf(stderr, "memfitd: scheduling loop: %s\n", e.what());
    }
    std::unique_lock<std::mutex> lock(mu_);
    wake_.wait_for(lock, std::chrono::milliseconds(200));
  }
}

void Core::tick() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::string> ended;
  for (auto& [id, a] : active_) {
    poll(id, a);
    if (a.cancel_deadline_ms > 0 && now() >= a.cancel_deadline_ms) {
      a.proc.kill();
      a.cancel_deadline_ms = 0;
    }
    if (a.proc.exited()) {
      poll(id, a);  // lines written just before the exit
      ended.push_back(id);
    }
  }
  for (const auto& id : ended) {
    finish(id, active_.at(id));
    active_.erase(id);
  }
  if (!cfg_.paused) {
    for (const auto& p : sched_.schedule(now())) start_worker(p);
  }
}

void Core::start_worker(const sched::Placement& p) {
  v1::Job j = load(p.job_id);
  const fs::path dir = fs::path(cfg_.state_dir) / "jobs" / j.id();
  std::error_code ec;
  fs::create_directories(dir, ec);
  std::string spec_json;
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(j.spec(), &spec_json, o);
  {
    std::ofstream f(dir / "spec.json");
    f << spec_json;
  }
  const DeviceInfo* dev = nullptr;
  for (const auto& d : devices_.devices()) {
    if (d.name == p.device) dev = &d;
  }
  WorkerLaunch l;
  l.binary = cfg_.worker;
  l.dir = dir.string();
  l.args = {"run", "--spec", (dir / "spec.json").string()};
  if (dev != nullptr && dev->kind == "cuda") {
    l.args.insert(l.args.end(), {"--device", "cuda:0"});
    l.env.push_back("CUDA_VISIBLE_DEVICES=" + std::to_string(dev->index));
  } else {
    l.args.insert(l.args.end(), {"--device", "cpu", "--memory-limit", std::to_string(p.reservation_bytes), "--threads",
                                 std::to_string(device_model().threads)});
  }
  const int64_t queued_ms = now() - ms_of(j.created_at());
  j.set_attempts(j.attempts() + 1);
  j.set_device(p.device);
  j.mutable_plan()->set_reserved_bytes(p.reservation_bytes);
  try {
    Active a;
    a.proc = WorkerProcess::start(l);
    a.device = p.device;
    a.reservation = p.reservation_bytes;
    store_.put_worker({j.id(), a.proc.pid(), p.device, p.reservation_bytes, a.proc.out_path(), a.proc.offset(), j.attempts()});
    j.set_state(v1::RUNNING);
    if (!j.has_started_at()) *j.mutable_started_at() = ts(now());
    record(j, "placed",
           "running on " + p.device + " with " + size(p.reservation_bytes) + " reserved (attempt " +
               std::to_string(j.attempts()) + ", worker " + std::to_string(a.proc.pid()) + ")");
    active_.emplace(j.id(), std::move(a));
    new_placements_.push_back(static_cast<double>(queued_ms) / 1000.0);
  } catch (const std::exception& e) {
    sched_.release(j.id());
    j.set_state(v1::FAILED);
    j.mutable_failure()->set_kind(v1::SYSTEM);
    j.mutable_failure()->set_reason("internal");
    j.mutable_failure()->set_message(e.what());
    *j.mutable_finished_at() = ts(now());
    record(j, "failed", e.what());
  }
}

void Core::poll(const std::string& id, Active& a) {
  const auto lines = a.proc.read_lines();
  if (lines.empty()) return;
  v1::Job j = load(id);
  for (const auto& line : lines) {
    json e;
    try {
      e = json::parse(line);
    } catch (const json::exception&) {
      continue;  // not an event line
    }
    const std::string kind = e.value("event", "");
    v1::Progress* pr = j.mutable_progress();
    std::string msg;
    if (kind == "started") {
      pr->set_total_steps(e.value("total_steps", int64_t{0}));
      msg = "training " + std::to_string(pr->total_steps()) + " steps";
    } else if (kind == "step") {
      ++a.steps;
      pr->set_step(e.value("step", int64_t{0}));
      pr->set_total_steps(e.value("total_steps", pr->total_steps()));
      pr->set_loss(e.value("loss", 0.0));
      pr->set_learning_rate(e.value("lr", 0.0));
      pr->set_samples_per_second(e.value("samples_per_second", 0.0));
      pr->set_tokens_per_second(e.value("tokens_per_second", 0.0));
      pr->set_memory_bytes(e.value("memory_bytes", int64_t{0}));
      pr->set_peak_memory_bytes(std::max(pr->peak_memory_bytes(), e.value("peak_memory_bytes", int64_t{0})));
      if (e.contains("activation_bytes")) pr->set_activation_bytes(e.value("activation_bytes", int64_t{0}));
      char buf[96];
      std::snprintf(buf, sizeof buf, "step %lld/%lld loss %.4f", static_cast<long long>(pr->step()),
                    static_cast<long long>(pr->total_steps()), pr->loss());
      msg = buf;
    } else if (kind == "eval") {
      pr->set_eval_loss(e.value("loss", 0.0));
      if (e.contains("accuracy")) pr->set_eval_accuracy(e.value("accuracy", 0.0));
      msg = "eval loss " + std::to_string(pr->eval_loss());
    } else if (kind == "checkpoint") {
      pr->set_last_checkpoint(e.value("path", ""));
      msg = "checkpoint " + pr->last_checkpoint();
    } else if (kind == "finished") {
      a.terminal = "finished";
      a.measured_peak = e.value("peak_memory_bytes", int64_t{0});
      a.measured_reserved = e.value("peak_reserved_bytes", int64_t{0});
      pr->set_peak_memory_bytes(std::max(pr->peak_memory_bytes(), a.measured_peak));
      if (e.contains("activation_bytes")) pr->set_activation_bytes(e.value("activation_bytes", int64_t{0}));
      v1::JobResult* res = j.mutable_result();
      if (e.contains("output")) {
        res->set_adapter_dir(e["output"].value("adapter", ""));
        res->set_model_dir(e["output"].value("model", ""));
      }
      if (e.contains("eval")) {
        res->set_eval_loss(e["eval"].value("loss", 0.0));
        if (e["eval"].contains("accuracy")) res->set_eval_accuracy(e["eval"].value("accuracy", 0.0));
      }
      res->set_measured_peak_bytes(a.measured_peak);
      res->set_early_stopped(e.value("early_stopped", false));
      msg = "finished; measured peak " + size(a.measured_peak);
    } else if (kind == "failed") {
      a.terminal = "failed";
      a.fail_reason = e.value("reason", "internal");
      a.fail_message = e.value("message", "");
      msg = a.fail_reason + ": " + a.fail_message;
    } else if (kind == "stopped") {
      a.terminal = "stopped";
      msg = "stopped after a checkpoint";
    } else {
      continue;
    }
    record(j, kind, msg, line);
  }
  store_.set_worker_offset(id, a.proc.offset());
}

void Core::requeue(v1::Job& j, int64_t reservation, const std::string& kind, const std::string& why) {
  j.set_state(v1::QUEUED);
  j.set_device("");
  j.mutable_plan()->set_reserved_bytes(reservation);
  record(j, kind, why);
  sched_.enqueue({j.id(), j.owner(), j.priority(), ms_of(j.created_at()), reservation});
}

void Core::finish(const std::string& id, Active& a) {
  sched_.release(id);
  store_.remove_worker(id);
  v1::Job j = load(id);
  const std::string key = j.plan().calibration_key();
  const int64_t est = j.plan().estimated_peak_bytes();
  auto fail = [&](v1::FailureKind k, const std::string& reason, const std::string& message) {
    j.set_state(v1::FAILED);
    j.mutable_failure()->set_kind(k);
    j.mutable_failure()->set_reason(reason);
    j.mutable_failure()->set_message(message);
    *j.mutable_finished_at() = ts(now());
    record(j, "state", "failed: " + message);
  };
  if (j.state() == v1::CANCELLING) {
    j.set_state(v1::CANCELLED);
    *j.mutable_finished_at() = ts(now());
    record(j, "state", "cancelled");
    return;
  }
  if (a.terminal == "finished") {
    j.set_state(v1::SUCCEEDED);
    *j.mutable_finished_at() = ts(now());
    record(j, "state", "succeeded");
    // Learn from the measured peak (like against like: on CUDA the caching allocator's
    // reserved bytes plus the context the estimate counts).
    const bool cuda = device_model().kind == estimator::DeviceModel::Kind::kCUDA;
    const int64_t measured = cuda ? a.measured_reserved + estimator::DeviceModel::kCudaContextBytes : a.measured_peak;
    // Only a run that trained measured the whole step (a resume at the last step did not).
    if (est > 0 && measured > 0 && a.steps > 0) {
      if (!key.empty()) {
        calibration_.add({key, est, measured});
        store_.add_calibration({key, est, measured, now()});
      }
      new_ratios_.push_back(static_cast<double>(measured) / static_cast<double>(est));
    }
    return;
  }
  if (a.terminal == "failed") {
    if (a.fail_reason == "oom") {
      const int ooms = j.attempts();
      const int64_t next = policy_.after_oom(a.reservation, ooms, sched_.largest_device_bytes());
      if (!key.empty() && est > 0) {
        // The job needed more than its reservation: a lower bound on its peak.
        calibration_.add({key, est, a.reservation + 1});
        store_.add_calibration({key, est, a.reservation + 1, now()});
      }
      if (next > 0) {
        ++oom_retries_total_;
        requeue(j, next, "oom", "out of memory with " + size(a.reservation) + " reserved; queued again with " + size(next));
        return;
      }
      fail(v1::SYSTEM, "oom", "out of memory with " + size(a.reservation) + " reserved, after " + std::to_string(ooms) +
                                  " attempts");
      return;
    }
    const bool user = a.fail_reason == "bad_input";
    fail(user ? v1::USER_INPUT : v1::SYSTEM, a.fail_reason, a.fail_message);
    return;
  }
  if (a.terminal == "stopped") {
    requeue(j, a.reservation, "requeued", "the worker stopped after a checkpoint; it resumes when placed again");
    return;
  }
  // No final event: the worker crashed or was killed. It resumes from its last checkpoint.
  if (j.attempts() < 3) {
    requeue(j, a.reservation, "requeued", "the worker ended without a result (exit " + std::to_string(a.proc.exit_code()) +
                                              "); it resumes from its last checkpoint");
    return;
  }
  fail(v1::SYSTEM, "crashed", "the worker ended without a result " + std::to_string(j.attempts()) + " times");
}

v1::Job Core::cancel(const Caller& c, const std::string& id) {
  v1::Job j = load(id);
  check_access(c, j);
  std::lock_guard<std::mutex> lock(mu_);
  j = load(id);
  if (terminal(j.state()) || j.state() == v1::CANCELLING) return j;
  if (j.state() == v1::QUEUED) {
    sched_.remove_queued(id);
    j.set_state(v1::CANCELLED);
    *j.mutable_finished_at() = ts(now());
    record(j, "state", "cancelled by " + c.user + " while queued");
    return j;
  }
  j.set_state(v1::CANCELLING);
  record(j, "state", "cancel requested by " + c.user + "; the worker checkpoints and stops");
  auto it = active_.find(id);
  if (it != active_.end()) {
    it->second.proc.terminate();
    it->second.cancel_deadline_ms = now() + static_cast<int64_t>(cfg_.cancel_grace_seconds * 1000);
  }
  wake_.notify_all();
  return j;
}

void Core::stop(bool graceful) {
  if (!running_.exchange(false)) {
    if (thread_.joinable()) thread_.join();
    return;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
  if (!graceful) return;
  std::lock_guard<std::mutex> lock(mu_);
  for (auto& [id, a] : active_) a.proc.terminate();
  const int64_t deadline = now() + static_cast<int64_t>(cfg_.cancel_grace_seconds * 1000);
  while (!active_.empty()) {
    std::vector<std::string> ended;
    for (auto& [id, a] : active_) {
      poll(id, a);
      if (now() >= deadline) a.proc.kill();
      if (a.proc.exited()) {
        poll(id, a);
        ended.push_back(id);
      }
    }
    for (const auto& id : ended) {
      Active& a = active_.at(id);
      v1::Job j = load(id);
      if (a.terminal.empty() || a.terminal == "stopped") {
        // Not the worker's fault: back to the queue, to resume at the next start.
        sched_.release(id);
        store_.remove_worker(id);
        if (j.state() == v1::CANCELLING) {
          j.set_state(v1::CANCELLED);
          *j.mutable_finished_at() = ts(now());
          record(j, "state", "cancelled");
        } else {
          j.set_state(v1::QUEUED);
          j.set_device("");
          record(j, "requeued", "memfitd is stopping; the job resumes from its checkpoint at the next start");
        }
      } else {
        finish(id, a);
      }
      active_.erase(id);
    }
    if (!active_.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
}

}  // namespace memfit::daemon
