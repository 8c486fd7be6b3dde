// memfitd's core driven tick by tick: a real store (SQLite in a temporary folder), a fake
// worker launcher and a fake clock, no processes and no sleeps. Every transition of a
// job, including the races: cancel against submit, placement and completion.
#include <gtest/gtest.h>
#include <sqlite3.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <map>
#include <mutex>
#include <condition_variable>
#include <set>

#include "core.h"

namespace memfit::daemon {
namespace {

namespace fs = std::filesystem;
constexpr int64_t MiB = int64_t{1} << 20;

// What the test controls of one fake worker.
struct Script {
  std::vector<std::string> lines;  // handed out by the next read_lines()
  bool exited = false;
  int exit_code = -1, signal = 0;
  int terminated = 0, killed = 0;
};

class FakeWorker : public Worker {
 public:
  FakeWorker(std::shared_ptr<Script> s, int64_t pid) : s_(std::move(s)), pid_(pid) {}
  int64_t pid() const override { return pid_; }
  const std::string& out_path() const override { return path_; }
  int64_t offset() const override { return 0; }
  std::vector<std::string> read_lines() override { return std::exchange(s_->lines, {}); }
  bool exited() override { return s_->exited; }
  int exit_code() const override { return s_->exit_code; }
  int exit_signal() const override { return s_->signal; }
  void terminate() override { ++s_->terminated; }
  void kill() override {
    ++s_->killed;
    s_->exited = true;
    s_->signal = 9;
  }

 private:
  std::shared_ptr<Script> s_;
  int64_t pid_;
  std::string path_ = "/dev/null";
};

class FakeLauncher : public WorkerLauncher {
 public:
  std::unique_ptr<Worker> start(const WorkerLaunch& l) override {
    if (on_start) on_start(l);
    std::lock_guard<std::mutex> lock(mu);  // the Slurm executor starts several at once
    if (fail_next) {
      fail_next = false;
      throw std::runtime_error("no such binary");
    }
    launches.push_back(l);
    auto s = std::make_shared<Script>();
    by_job[l.job_id] = s;
    pid_of[l.job_id] = 1000 + static_cast<int64_t>(launches.size());
    return std::make_unique<FakeWorker>(s, pid_of[l.job_id]);
  }
  std::unique_ptr<Worker> adopt(int64_t pid, const std::string&, int64_t) override {
    const auto it = alive.find(pid);
    if (it == alive.end()) return nullptr;
    return std::make_unique<FakeWorker>(it->second, pid);
  }
  std::unique_ptr<Worker> gone(const std::string&, int64_t) override {
    auto s = std::make_shared<Script>();
    s->exited = true;
    s->lines = gone_lines;
    return std::make_unique<FakeWorker>(s, 0);
  }
  std::map<std::string, std::string> withdraw(const std::set<std::string>& ids) override {
    withdraw_asked = ids;
    std::map<std::string, std::string> out;
    for (const auto& id : ids) {
      if (strays.count(id)) out[id] = strays[id];
    }
    return out;
  }
  std::map<std::string, std::string> strays;  // job id -> what withdraw() "cancels"
  std::set<std::string> withdraw_asked;
  std::vector<WorkerLaunch> launches;
  std::map<std::string, std::shared_ptr<Script>> by_job;
  std::map<std::string, int64_t> pid_of;  // the latest attempt's
  std::map<int64_t, std::shared_ptr<Script>> alive;
  std::vector<std::string> gone_lines;
  bool fail_next = false;
  std::mutex mu;
  std::function<void(const WorkerLaunch&)> on_start;  // runs inside start() (the executor's wait)
};

class FakeDevices : public DeviceMonitor {
 public:
  explicit FakeDevices(int64_t bytes, const std::string& name = "cpu:0") { d_.push_back({name, "cpu", "configured", bytes, 0}); }
  void add(const std::string& name, int64_t bytes) { d_.push_back({name, "cpu", "configured", bytes, 0}); }
  const std::vector<DeviceInfo>& devices() const override { return d_; }
  int64_t used_bytes(const std::string&) override { return -1; }

 private:
  std::vector<DeviceInfo> d_;
};

const char* kFinished = R"({"event":"finished","peak_memory_bytes":1000,"output":{"adapter":"/x"}})";
const char* kOom = R"({"event":"failed","reason":"oom","message":"out of memory"})";
const char* kStep = R"({"event":"step","step":1,"total_steps":10,"loss":3.0,"peak_memory_bytes":900})";

class CoreTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/memfit-core-XXXXXX";
    dir_ = mkdtemp(tmpl);
    fs::create_directories(dir_ + "/in/tok");
    fs::create_directories(dir_ + "/out");
    std::ofstream(dir_ + "/in/config.json")
        << R"({"model_type":"gpt2","vocab_size":1000,"n_embd":32,"n_layer":1,"n_head":2,"n_positions":64})";
    std::ofstream(dir_ + "/in/train.txt") << "some text";
    cfg_.state_dir = dir_ + "/state";
    cfg_.read_roots = {dir_ + "/in"};
    cfg_.write_roots = {dir_ + "/out"};
    cfg_.worker = "/nonexistent/memfit-worker";
    cfg_.worker_threads = 1;
    cfg_.cancel_grace_seconds = 5;
    cfg_.crash_retries = 2;
    cfg_.oom_retries = 2;
    cfg_.max_user_priority = 10;
    Open();
  }
  void TearDown() override {
    core_.reset();
    store_.reset();
    fs::remove_all(dir_);
  }
  void Open() {
    core_.reset();
    store_ = store::Store::open(cfg_.state_dir);
    core_ = std::make_unique<Core>(cfg_, *store_, devices_, [this] { return now_; }, &launcher_);
    core_->start(/*run_loop=*/false);
  }
  // The Slurm executor on one partition of one GPU in 16 shards of 16 MiB (Open() applies it).
  void UseSlurm() {
    cfg_.executor = "slurm";
    cfg_.slurm.partition = "p";
    cfg_.slurm.shard_memory = 16 * MiB;
    cfg_.slurm.shards_per_gpu = 16;
    cfg_.slurm.gpus = 1;
  }
  v1::SubmitJobRequest Request(const std::string& out = "") {
    v1::SubmitJobRequest r;
    v1::JobSpec& s = *r.mutable_spec();
    s.set_name("t");
    s.mutable_model()->set_architecture("gpt2");
    s.mutable_model()->set_config_path(dir_ + "/in/config.json");
    s.mutable_data()->set_train_path(dir_ + "/in/train.txt");
    s.mutable_data()->set_format("text");
    s.mutable_data()->set_tokenizer_path(dir_ + "/in/tok");
    s.mutable_method()->set_kind("lora");
    s.mutable_training()->set_steps(10);
    s.mutable_training()->set_micro_batch(2);
    s.mutable_training()->set_sequence_length(16);
    s.set_output_dir(out);
    return r;
  }
  v1::Job Submit(Caller c = Caller{}) { return core_->submit(c, Request()); }
  v1::Job Get(const std::string& id) { return core_->get(Caller{}, id); }
  Script& W(const std::string& id) { return *launcher_.by_job.at(id); }
  void End(const std::string& id, const std::string& line) {
    if (!line.empty()) W(id).lines.push_back(line);
    W(id).exited = true;
    core_->tick();
  }
  std::vector<std::string> Kinds(const std::string& id) {
    v1::ListJobEventsRequest r;
    r.set_id(id);
    r.set_page_size(1000);
    std::vector<std::string> k;
    const v1::ListJobEventsResponse resp = core_->events(Caller{}, r);
    for (const auto& e : resp.events()) k.push_back(e.kind());
    return k;
  }
  int64_t Reserved() { return core_->devices().devices(0).reserved_bytes(); }

  std::string dir_;
  Config cfg_;
  int64_t now_ = 1'700'000'000'000;
  FakeDevices devices_{256 * MiB};
  FakeLauncher launcher_;
  std::unique_ptr<store::Store> store_;
  std::unique_ptr<Core> core_;
};

TEST_F(CoreTest, SubmitPlaceFinish) {
  const v1::Job j = Submit();
  EXPECT_EQ(j.state(), v1::QUEUED);
  core_->tick();
  EXPECT_EQ(Get(j.id()).state(), v1::RUNNING);
  ASSERT_EQ(launcher_.launches.size(), 1u);
  const WorkerLaunch& l = launcher_.launches[0];
  // Confinement handed to the worker: its roots, its job, a kernel memory limit.
  const auto has = [&](const std::string& a, const std::string& b) {
    for (size_t i = 0; i + 1 < l.args.size(); ++i) {
      if (l.args[i] == a && l.args[i + 1] == b) return true;
    }
    return false;
  };
  EXPECT_TRUE(has("--input-root", dir_ + "/in"));
  EXPECT_TRUE(has("--output-root", dir_ + "/state/jobs/" + j.id()));
  EXPECT_TRUE(has("--job-id", j.id()));
  EXPECT_EQ(l.confine.memory_limit_bytes, Get(j.id()).plan().reserved_bytes() + cfg_.worker_memory_allowance);
  EXPECT_TRUE(fs::exists(dir_ + "/state/jobs/" + j.id() + "/output/.memfit-job"));
  EXPECT_GT(Reserved(), 0);
  W(j.id()).lines.push_back(kStep);
  core_->tick();
  EXPECT_EQ(Get(j.id()).progress().step(), 1);
  End(j.id(), kFinished);
  const v1::Job done = Get(j.id());
  EXPECT_EQ(done.state(), v1::SUCCEEDED);
  EXPECT_EQ(done.result().measured_peak_bytes(), 1000);
  EXPECT_EQ(Reserved(), 0);
}

std::string StepAt(int step, double tokens_per_second) {
  return R"({"event":"step","step":)" + std::to_string(step) + R"(,"total_steps":100,"loss":3.0,"tokens_per_second":)" +
         std::to_string(tokens_per_second) + "}";
}

// Compute-aware placement in the daemon: two jobs submitted together go to two idle
// devices, and the throughput workers report alone and shared teaches memfitd how much of
// a device the kind uses, shown by ListDevices and /metrics and used for placement.
TEST_F(CoreTest, SpreadsOverIdleDevicesAndLearnsComputeSharing) {
  devices_.add("cpu:1", 256 * MiB);
  Open();
  const v1::Job a = Submit(), b = Submit();
  core_->tick();
  const std::string da = Get(a.id()).device(), db = Get(b.id()).device();
  ASSERT_FALSE(da.empty());
  ASSERT_FALSE(db.empty());
  EXPECT_NE(da, db) << "two jobs on one device while the other idled";
  const std::string kind = Get(a.id()).plan().compute_kind();
  EXPECT_EQ(kind, "gpt2|attention|cpu|d32xL1|lora|fp32|2x16");
  EXPECT_EQ(Get(b.id()).plan().compute_kind(), kind);
  // a alone: 1000 tokens/s (its first step, the warm-up, does not count).
  W(a.id()).lines = {StepAt(1, 10), StepAt(2, 1000), StepAt(3, 1000), StepAt(4, 1000)};
  core_->tick();
  // A third job of the same kind shares a device: 800 tokens/s beside one other job.
  const v1::Job c = Submit();
  core_->tick();
  const std::string dc = Get(c.id()).device();
  ASSERT_FALSE(dc.empty());
  W(c.id()).lines = {StepAt(1, 10), StepAt(2, 800), StepAt(3, 800), StepAt(4, 800)};
  core_->tick();
  const v1::ListDevicesResponse devs = core_->devices();
  ASSERT_EQ(devs.kinds_size(), 1);
  const v1::ComputeKind& k = devs.kinds(0);
  EXPECT_EQ(k.kind(), kind);
  EXPECT_EQ(k.solo_steps(), 3);
  EXPECT_EQ(k.shared_steps(), 3);
  EXPECT_DOUBLE_EQ(k.solo_rate(), 1000);
  EXPECT_DOUBLE_EQ(k.shared_rate(), 800);
  EXPECT_DOUBLE_EQ(k.slowdown(), 1.25);
  EXPECT_DOUBLE_EQ(k.compute(), 0.625);  // 1.25 slower with two jobs on the device
  // c's device now counts c at 0.625 (its neighbour at 1 until its own next step).
  for (const auto& d : devs.devices()) {
    if (d.name() == dc) {
      EXPECT_DOUBLE_EQ(d.committed_compute(), 1.625);
    }
  }
  const Snapshot snap = core_->snapshot();
  ASSERT_EQ(snap.kinds.size(), 1u);
  EXPECT_DOUBLE_EQ(snap.kinds[0].slowdown, 1.25);
  // Once every job is gone, no compute stays committed.
  for (const auto* j : {&a, &b, &c}) End(j->id(), kFinished);
  const v1::ListDevicesResponse idle = core_->devices();
  for (const auto& d : idle.devices()) EXPECT_EQ(d.committed_compute(), 0.0) << d.name();
  // What was learned survives a restart of memfitd.
  core_->stop(/*graceful=*/false);
  Open();
  const v1::ListDevicesResponse again = core_->devices();
  ASSERT_EQ(again.kinds_size(), 1);
  EXPECT_EQ(again.kinds(0).kind(), kind);
  EXPECT_DOUBLE_EQ(again.kinds(0).slowdown(), 1.25);
  EXPECT_DOUBLE_EQ(again.kinds(0).compute(), 0.625);
  // The next job of this kind is queued with its learned share.
  const v1::Job e = Submit();
  core_->tick();
  const std::string de = Get(e.id()).device();
  const v1::ListDevicesResponse one = core_->devices();
  int seen = 0;
  for (const auto& d : one.devices()) {
    if (d.name() == de) {
      EXPECT_DOUBLE_EQ(d.committed_compute(), 0.625);
      ++seen;
    }
  }
  EXPECT_EQ(seen, 1);
}

// With the Slurm executor a failed submission (a controller restarting) is not the job's
// end: it waits out a back-off and is queued again, on its crash budget; cancel reaches it.
TEST_F(CoreTest, SlurmSubmissionFailuresBackOffThenRetry) {
  UseSlurm();
  cfg_.crash_retries = 1;
  Open();
  const v1::Job j = Submit();
  launcher_.fail_next = true;
  core_->tick();
  v1::Job got = Get(j.id());
  EXPECT_EQ(got.state(), v1::QUEUED);
  EXPECT_EQ(got.crash_retries(), 1);
  EXPECT_EQ(Kinds(j.id()).back(), "requeued");
  EXPECT_EQ(Reserved(), 0);
  core_->tick();
  EXPECT_TRUE(launcher_.launches.empty());  // still backing off
  now_ += 30'000;
  core_->tick();  // back in the queue
  core_->tick();
  ASSERT_EQ(launcher_.launches.size(), 1u);
  EXPECT_EQ(Get(j.id()).state(), v1::RUNNING);
  End(j.id(), kFinished);
  // The budget spent: the next failure fails the job, naming the cause.
  const v1::Job k = Submit();
  launcher_.fail_next = true;
  core_->tick();
  now_ += 30'000;
  core_->tick();
  core_->tick();
  ASSERT_EQ(Get(k.id()).state(), v1::RUNNING);  // retried once
  const v1::Job m = Submit();
  // m's first failure: held; cancelled while held, it never starts.
  launcher_.fail_next = true;
  core_->tick();
  EXPECT_EQ(Get(m.id()).state(), v1::QUEUED);
  core_->cancel(Caller{}, m.id());
  now_ += 60'000;
  core_->tick();
  core_->tick();
  EXPECT_EQ(Get(m.id()).state(), v1::CANCELLED);
  EXPECT_EQ(launcher_.launches.size(), 2u);
  End(k.id(), kFinished);
  const v1::Job n = Submit();
  launcher_.fail_next = true;
  core_->tick();
  now_ += 30'000;
  launcher_.fail_next = true;  // queued again and started in one tick: fails again
  core_->tick();
  const v1::Job failed = Get(n.id());
  EXPECT_EQ(failed.state(), v1::FAILED);
  EXPECT_NE(failed.failure().message().find("no such binary"), std::string::npos) << failed.failure().message();
}

// sbatch waits on slurmctld, so the Slurm executor submits without memfitd's lock: while a
// submission hangs, cancel and devices answer at once (from other threads). A cancel that
// lands meanwhile wins: the submitted Slurm job is withdrawn, the reservation freed, and
// the next job starts normally.
TEST_F(CoreTest, SlurmSubmitsWithoutTheLockAndACancelMeanwhileWithdrawsIt) {
  UseSlurm();
  Open();
  const v1::Job j = Submit();
  bool answered = false;
  std::future<v1::Job> cancel;  // out here: a std::async future waits for its task when destroyed
  std::future<v1::ListDevicesResponse> devices;
  launcher_.on_start = [&](const WorkerLaunch&) {
    cancel = std::async(std::launch::async, [&] { return core_->cancel(Caller{}, j.id()); });
    devices = std::async(std::launch::async, [&] { return core_->devices(); });
    // Under the lock these would wait for the tick (this thread) to return: they never
    // would in time, and the test fails here rather than hangs.
    answered = cancel.wait_for(std::chrono::seconds(20)) == std::future_status::ready &&
               devices.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
    if (answered) {
      EXPECT_EQ(devices.get().devices_size(), 1);
    }
  };
  core_->tick();
  launcher_.on_start = nullptr;
  ASSERT_TRUE(answered);
  EXPECT_EQ(cancel.get().state(), v1::CANCELLED);
  const v1::Job got = Get(j.id());
  EXPECT_EQ(got.state(), v1::CANCELLED);
  ASSERT_EQ(launcher_.launches.size(), 1u);
  EXPECT_EQ(launcher_.by_job.at(j.id())->killed, 1);  // the Slurm job is withdrawn
  EXPECT_EQ(Kinds(j.id()).back(), "executor");
  EXPECT_EQ(Reserved(), 0);
  // Nothing of it is left behind: the next job is placed and runs.
  const v1::Job k = Submit();
  core_->tick();
  EXPECT_EQ(Get(k.id()).state(), v1::RUNNING);
  EXPECT_EQ(Reserved(), Get(k.id()).plan().reserved_bytes());
  End(k.id(), kFinished);
  // sbatch fails while the job is being cancelled: cancelled all the same, the failure in
  // its events (sbatch may have queued something), nothing reserved, no retry.
  const v1::Job m = Submit();
  launcher_.fail_next = true;
  launcher_.on_start = [&](const WorkerLaunch&) {
    cancel = std::async(std::launch::async, [&] { return core_->cancel(Caller{}, m.id()); });
    answered = cancel.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
  };
  core_->tick();
  launcher_.on_start = nullptr;
  ASSERT_TRUE(answered);
  EXPECT_EQ(Get(m.id()).state(), v1::CANCELLED);
  const auto km = Kinds(m.id());
  EXPECT_EQ(km.back(), "executor");
  EXPECT_EQ(std::count(km.begin(), km.end(), "requeued"), 0);
  EXPECT_EQ(Reserved(), 0);
  now_ += 120'000;
  core_->tick();
  core_->tick();
  EXPECT_EQ(launcher_.launches.size(), 2u);  // j and k only
  // A restart asks Slurm about the cancelled jobs too: a submission that was under way
  // when memfitd died must not run.
  Open();
  EXPECT_TRUE(launcher_.withdraw_asked.count(j.id()) && launcher_.withdraw_asked.count(m.id()));
  EXPECT_FALSE(launcher_.withdraw_asked.count(k.id()));  // succeeded: its Slurm job ended
}

// The store fails (a full disk) while one of two jobs placed in the same tick is being
// recorded as running: nothing runs that memfitd does not track. That job's worker is
// stopped and its place given back; the other job runs; once the store works again the
// job is placed anew, and a restart meanwhile finds it queued, not adopted. Both
// executors (local starts under the lock, Slurm without it). The failure is a trigger in
// memfit.db, made through a second connection, that refuses exactly that write.
TEST_F(CoreTest, StoreFailingAtOneStartStopsThatWorkerAndTheOthersRun) {
  for (const bool slurm : {false, true}) {
    SCOPED_TRACE(slurm ? "slurm" : "local");
    if (slurm) {
      core_.reset();
      store_.reset();
      fs::remove_all(cfg_.state_dir);
      launcher_.launches.clear();
      launcher_.by_job.clear();
      UseSlurm();
    }
    Open();
    const v1::Job a = Submit(), b = Submit();
    auto sql = [&](const std::string& text) {
      sqlite3* db = nullptr;
      ASSERT_EQ(sqlite3_open((cfg_.state_dir + "/memfit.db").c_str(), &db), SQLITE_OK);
      EXPECT_EQ(sqlite3_exec(db, text.c_str(), nullptr, nullptr, nullptr), SQLITE_OK) << sqlite3_errmsg(db);
      sqlite3_close(db);
    };
    sql("CREATE TRIGGER full_disk BEFORE UPDATE ON jobs WHEN NEW.id = '" + a.id() +
        "' AND NEW.state = 2 BEGIN SELECT RAISE(ABORT, 'database or disk is full'); END;");
    EXPECT_THROW(core_->tick(), std::exception);
    ASSERT_EQ(launcher_.launches.size(), 2u);
    EXPECT_EQ(W(a.id()).killed, 1);  // started, then stopped: its record could not say so
    EXPECT_EQ(W(b.id()).killed, 0);
    EXPECT_EQ(Get(a.id()).state(), v1::QUEUED);
    EXPECT_EQ(Get(b.id()).state(), v1::RUNNING);
    EXPECT_EQ(Reserved(), Get(b.id()).plan().reserved_bytes());  // a's place is free again
    // While the store still fails, a is held back, not retried at every tick.
    core_->tick();
    EXPECT_EQ(launcher_.launches.size(), 2u);
    // A restart now: a is queued (its worker row, written before the failure, adopts
    // nothing), b is adopted.
    launcher_.alive[launcher_.pid_of.at(b.id())] = launcher_.by_job.at(b.id());
    Open();
    EXPECT_EQ(Get(a.id()).state(), v1::QUEUED);
    EXPECT_EQ(Get(b.id()).state(), v1::RUNNING);
    EXPECT_EQ(Reserved(), Get(b.id()).plan().reserved_bytes());
    // The disk has room again: a is placed and runs.
    sql("DROP TRIGGER full_disk;");
    now_ += 1000;
    core_->tick();
    core_->tick();
    ASSERT_EQ(launcher_.launches.size(), 3u);
    EXPECT_EQ(launcher_.launches.back().job_id, a.id());
    EXPECT_EQ(Get(a.id()).state(), v1::RUNNING);
    EXPECT_EQ(Reserved(), Get(a.id()).plan().reserved_bytes() + Get(b.id()).plan().reserved_bytes());
    End(a.id(), kFinished);
    End(b.id(), kFinished);
    EXPECT_EQ(Get(a.id()).state(), v1::SUCCEEDED);
    EXPECT_EQ(Get(b.id()).state(), v1::SUCCEEDED);
    EXPECT_EQ(Reserved(), 0);
  }
}

// A burst of placements waits on the Slurm controller once, not once per job: up to
// slurm.parallel_submissions sbatch run at once. Each scripted sbatch here returns only
// once as many as the setting allows are under way together (or after 10 s): one at a
// time, the first would give up waiting and the count would stay at 1.
TEST_F(CoreTest, SlurmRunsSeveralSbatchAtOnceUpToTheSetting) {
  UseSlurm();
  for (const int parallel : {4, 1}) {
    SCOPED_TRACE("parallel_submissions " + std::to_string(parallel));
    cfg_.slurm.parallel_submissions = parallel;
    Open();
    launcher_.launches.clear();
    std::vector<v1::Job> jobs;
    for (int i = 0; i < 6; ++i) jobs.push_back(Submit());
    std::mutex mu;
    std::condition_variable cv;
    int in_flight = 0, most = 0, entered = 0;
    launcher_.on_start = [&](const WorkerLaunch&) {
      std::unique_lock<std::mutex> l(mu);
      ++entered;
      most = std::max(most, ++in_flight);
      cv.notify_all();
      // The first `parallel` submissions wait for one another; later ones go at once.
      if (entered <= parallel) cv.wait_for(l, std::chrono::seconds(10), [&] { return entered >= parallel; });
      --in_flight;
    };
    core_->tick();
    launcher_.on_start = nullptr;
    EXPECT_EQ(most, parallel);
    ASSERT_EQ(launcher_.launches.size(), 6u);
    int64_t reserved = 0;
    for (const auto& j : jobs) {
      const v1::Job got = Get(j.id());
      EXPECT_EQ(got.state(), v1::RUNNING) << j.id();
      reserved += got.plan().reserved_bytes();
      EXPECT_EQ(Kinds(j.id()).back(), "placed");
    }
    EXPECT_EQ(Reserved(), reserved);
    for (const auto& j : jobs) End(j.id(), kFinished);
    EXPECT_EQ(Reserved(), 0);
  }
}

// With slurm.run_as: submitter each worker runs as its job's owner, who can write the
// peaks it reports: what one owner's jobs measured (three finished jobs at twice the
// estimate here) raises that owner's later reservations only, never another user's.
TEST_F(CoreTest, SubmitterRunJobsCalibrateOnlyTheirOwnersJobs) {
  UseSlurm();
  cfg_.slurm.run_as = "submitter";
  cfg_.paused = true;
  Open();
  const v1::Job a = Submit(Caller{"alice", false}), b = Submit(Caller{"bob", false});
  const std::string ka = a.plan().calibration_key(), kb = b.plan().calibration_key();
  EXPECT_EQ(ka.substr(ka.size() - 12), "|owner:alice");
  EXPECT_EQ(kb.substr(kb.size() - 10), "|owner:bob");
  EXPECT_EQ(a.plan().calibrated_peak_bytes(), a.plan().estimated_peak_bytes());
  const int64_t est = a.plan().estimated_peak_bytes();
  for (int i = 0; i < 3; ++i) store_->add_calibration({ka, est, 2 * est, now_});
  Open();  // learned from the store at start, as after alice's jobs finished
  const v1::Job a2 = Submit(Caller{"alice", false}), b2 = Submit(Caller{"bob", false});
  EXPECT_EQ(a2.plan().calibrated_peak_bytes(), 2 * est);  // twice: the most calibration grows
  EXPECT_EQ(b2.plan().calibrated_peak_bytes(), est);
  EXPECT_EQ(b2.plan().reserved_bytes(), b.plan().reserved_bytes());
  // With the service user running every job, what jobs measure is shared by all.
  cfg_.slurm.run_as = "service";
  Open();
  const v1::Job c = Submit(Caller{"carol", false});
  EXPECT_EQ(c.plan().calibration_key(), ka.substr(0, ka.size() - 12));
}

// A restart asks the executor, once for all queued jobs, to withdraw submissions memfitd
// never recorded, and says so in the job's events.
TEST_F(CoreTest, RestartWithdrawsUnrecordedSubmissionsOfQueuedJobs) {
  cfg_.paused = true;  // the jobs stay queued
  Open();
  const v1::Job a = Submit(), b = Submit();
  launcher_.strays[a.id()] = "Slurm job 7 of an unrecorded submission cancelled";
  Open();
  EXPECT_EQ(launcher_.withdraw_asked, (std::set<std::string>{a.id(), b.id()}));
  const auto ka = Kinds(a.id());
  EXPECT_EQ(ka.back(), "recovered");
  EXPECT_NE(Kinds(b.id()).back(), "recovered");
  EXPECT_EQ(Get(a.id()).state(), v1::QUEUED);
}

TEST_F(CoreTest, OutOfMemoryAndCrashBudgetsAreSeparate) {
  // Each End() ticks: the attempt ends and, when requeued, the job is placed again at once.
  const v1::Job j = Submit();
  const int64_t first = j.plan().reserved_bytes();
  core_->tick();
  End(j.id(), "");  // crash 1 (no result)
  EXPECT_EQ(Get(j.id()).crash_retries(), 1);
  W(j.id()).signal = 9;
  End(j.id(), "");  // crash 2
  v1::Job k = Get(j.id());
  EXPECT_EQ(k.state(), v1::RUNNING);
  EXPECT_EQ(k.attempts(), 3);
  EXPECT_EQ(k.crash_retries(), 2);
  EXPECT_EQ(k.oom_retries(), 0);
  End(j.id(), kOom);  // the OOM budget is untouched by the crashes
  k = Get(j.id());
  EXPECT_EQ(k.oom_retries(), 1);
  EXPECT_EQ(k.attempts(), 4);
  EXPECT_GT(k.plan().reserved_bytes(), first);
  EXPECT_EQ(launcher_.launches.back().confine.memory_limit_bytes,
            k.plan().reserved_bytes() + cfg_.worker_memory_allowance);
  End(j.id(), kOom);
  End(j.id(), kOom);  // third OOM: the two retries are spent
  k = Get(j.id());
  EXPECT_EQ(k.state(), v1::FAILED);
  EXPECT_EQ(k.failure().reason(), "oom");
  EXPECT_EQ(k.failure().kind(), v1::SYSTEM);
  EXPECT_EQ(k.attempts(), 5);
  EXPECT_EQ(Reserved(), 0);
}

TEST_F(CoreTest, CrashBudgetSpentFailsNamingTheSignal) {
  const v1::Job j = Submit();
  core_->tick();
  for (int i = 0; i < 3; ++i) {
    W(j.id()).signal = 11;
    End(j.id(), "");
  }
  const v1::Job k = Get(j.id());
  EXPECT_EQ(k.state(), v1::FAILED);
  EXPECT_EQ(k.failure().reason(), "crashed");
  EXPECT_NE(k.failure().message().find("SIGSEGV"), std::string::npos) << k.failure().message();
  const auto kinds = Kinds(j.id());
  EXPECT_EQ(std::count(kinds.begin(), kinds.end(), "requeued"), 2);
}

TEST_F(CoreTest, OutputWriteFailuresAreTheSystemsAndRetried) {
  const v1::Job j = Submit();
  core_->tick();
  End(j.id(), R"({"event":"failed","reason":"io","message":"/o/x.tmp: No space left on device"})");
  EXPECT_EQ(Get(j.id()).crash_retries(), 1);
  EXPECT_EQ(Get(j.id()).attempts(), 2);
  End(j.id(), R"({"event":"failed","reason":"bad_input","message":"data.train_path: empty"})");
  const v1::Job k = Get(j.id());
  EXPECT_EQ(k.state(), v1::FAILED);
  EXPECT_EQ(k.failure().kind(), v1::USER_INPUT);
}

TEST_F(CoreTest, CancelRacingSubmitNeverRuns) {
  std::string cancelled;
  core_->set_submit_hook_for_test([&](const std::string& id) {
    cancelled = id;
    EXPECT_EQ(core_->cancel(Caller{}, id).state(), v1::CANCELLED);
  });
  const v1::Job j = Submit();
  core_->set_submit_hook_for_test(nullptr);
  EXPECT_EQ(cancelled, j.id());
  EXPECT_EQ(core_->snapshot().queue_length, 0);  // never queued
  core_->tick();
  core_->tick();
  EXPECT_TRUE(launcher_.launches.empty());
  EXPECT_EQ(Get(j.id()).state(), v1::CANCELLED);
  EXPECT_EQ(Reserved(), 0);
}

TEST_F(CoreTest, CancelQueuedRunningAndRacingCompletion) {
  const v1::Job a = Submit();
  EXPECT_EQ(core_->cancel(Caller{}, a.id()).state(), v1::CANCELLED);
  core_->tick();
  EXPECT_TRUE(launcher_.launches.empty());

  const v1::Job b = Submit();
  core_->tick();
  EXPECT_EQ(core_->cancel(Caller{}, b.id()).state(), v1::CANCELLING);
  EXPECT_EQ(W(b.id()).terminated, 1);
  core_->tick();
  EXPECT_GT(Reserved(), 0);  // held until the process is gone
  End(b.id(), R"({"event":"stopped"})");
  EXPECT_EQ(Get(b.id()).state(), v1::CANCELLED);
  EXPECT_EQ(Reserved(), 0);

  // Cancel after the worker wrote its result: the finished run wins.
  const v1::Job c = Submit();
  core_->tick();
  W(c.id()).lines.push_back(kFinished);
  core_->cancel(Caller{}, c.id());
  End(c.id(), "");
  EXPECT_EQ(Get(c.id()).state(), v1::SUCCEEDED);

  // A worker that ignores SIGTERM is killed after the grace period.
  const v1::Job d = Submit();
  core_->tick();
  core_->cancel(Caller{}, d.id());
  now_ += 6000;
  core_->tick();
  EXPECT_EQ(W(d.id()).killed, 1);
  core_->tick();
  EXPECT_EQ(Get(d.id()).state(), v1::CANCELLED);
}

TEST_F(CoreTest, CancelRacingPlacementInTheSameTick) {
  const v1::Job j = Submit();
  // The cancel lands first under the lock; the placement that follows finds nothing.
  core_->cancel(Caller{}, j.id());
  core_->tick();
  EXPECT_TRUE(launcher_.launches.empty());
  EXPECT_EQ(Get(j.id()).state(), v1::CANCELLED);
}

TEST_F(CoreTest, GracefulStopRequeuesWithoutABudgetAndRecoveryResumes) {
  const v1::Job a = Submit();
  const v1::Job b = Submit();
  core_->tick();
  End(b.id().empty() ? a.id() : a.id(), kOom);  // a: OOM, requeued bigger (stop during an OOM retry)
  // b may be running too.
  for (auto& [id, s] : launcher_.by_job) {
    if (!s->exited) s->lines.push_back(R"({"event":"stopped"})"), s->exited = true;
  }
  core_->stop(/*graceful=*/true);
  for (const auto& id : {a.id(), b.id()}) {
    const v1::Job k = Get(id);
    EXPECT_EQ(k.state(), v1::QUEUED) << id;
    EXPECT_EQ(k.crash_retries(), 0) << id;
  }
  const int64_t grown = Get(a.id()).plan().reserved_bytes();
  EXPECT_GT(grown, a.plan().reserved_bytes());
  Open();  // a new daemon on the same state
  core_->tick();
  EXPECT_EQ(Get(a.id()).state(), v1::RUNNING);
  EXPECT_EQ(Get(a.id()).plan().reserved_bytes(), grown);
}

TEST_F(CoreTest, RecoveryOnAnotherExecutorFailsTheJobAndLeavesItsWorkerAlone) {
  const v1::Job a = Submit();
  core_->tick();
  ASSERT_EQ(Get(a.id()).state(), v1::RUNNING);
  // memfitd dies; its worker (pid 1001) lives on. It comes back with executor: slurm (one
  // device, slurm:gpu), where 1001 would be read as a Slurm job id.
  launcher_.alive[1001] = launcher_.by_job.at(a.id());
  FakeDevices slurm_devices(256 * MiB, "slurm:gpu");
  core_.reset();
  store_.reset();
  store_ = store::Store::open(cfg_.state_dir);
  core_ = std::make_unique<Core>(cfg_, *store_, slurm_devices, [this] { return now_; }, &launcher_);
  EXPECT_NO_THROW(core_->start(false));
  const v1::Job k = Get(a.id());
  EXPECT_EQ(k.state(), v1::FAILED);
  EXPECT_NE(k.failure().message().find("cpu:0"), std::string::npos) << k.failure().message();
  EXPECT_EQ(launcher_.by_job.at(a.id())->killed, 0);
  EXPECT_EQ(launcher_.by_job.at(a.id())->terminated, 0);
  core_.reset();
}

TEST_F(CoreTest, RecoveryAdoptsLiveWorkersAndFinishesGoneOnes) {
  const v1::Job a = Submit();
  core_->tick();
  const v1::Job b = Submit();
  core_->tick();
  // The daemon dies (no graceful stop); a's worker lives on, b's finished meanwhile.
  const int64_t pid_a = 1001;
  launcher_.alive[pid_a] = launcher_.by_job.at(a.id());
  launcher_.gone_lines = {kFinished};
  core_.reset();
  store_.reset();
  store_ = store::Store::open(cfg_.state_dir);
  core_ = std::make_unique<Core>(cfg_, *store_, devices_, [this] { return now_; }, &launcher_);
  core_->start(false);
  EXPECT_EQ(Kinds(a.id()).back(), "adopted");
  core_->tick();
  EXPECT_EQ(Get(a.id()).state(), v1::RUNNING);
  EXPECT_EQ(Get(b.id()).state(), v1::SUCCEEDED);
  End(a.id(), kFinished);
  EXPECT_EQ(Get(a.id()).state(), v1::SUCCEEDED);
}

TEST_F(CoreTest, CorruptRecordFailsThatJobAndTheDaemonStarts) {
  const v1::Job a = Submit();
  const v1::Job b = Submit();
  core_.reset();
  store_.reset();
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((cfg_.state_dir + "/memfit.db").c_str(), &db), SQLITE_OK);
  const std::string sql = "UPDATE jobs SET job = x'deadbeef00ff' WHERE id = '" + a.id() + "'";
  ASSERT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(db);
  Open();
  const v1::Job k = Get(a.id());
  EXPECT_EQ(k.state(), v1::FAILED);
  EXPECT_EQ(k.failure().reason(), store::kCorruptRecord);
  core_->tick();
  EXPECT_EQ(Get(b.id()).state(), v1::RUNNING);
  v1::ListJobsRequest all;
  EXPECT_EQ(core_->list(Caller{}, all).jobs_size(), 2);
}

// A worker's text fields are cut at 4096 bytes between characters: half a character
// would leave the job's record unreadable. And a record that did become unreadable while
// its job ran fails that job at the attempt's end, never queues a stub again.
TEST_F(CoreTest, WorkerTextIsCutBetweenCharactersAndACorruptRunningRecordIsNotRequeued) {
  const v1::Job j = Submit();
  core_->tick();
  W(j.id()).lines.push_back(R"({"event":"checkpoint","path":")" + std::string(4095, 'a') + "\xc3\xa9\"}");
  core_->tick();
  const v1::Job got = Get(j.id());
  EXPECT_EQ(got.failure().reason(), "");
  EXPECT_EQ(got.progress().last_checkpoint(), std::string(4095, 'a'));
  EXPECT_EQ(got.spec().model().architecture(), "gpt2");
  // The record is made unreadable behind memfitd's back; the worker then reports OOM.
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open((cfg_.state_dir + "/memfit.db").c_str(), &db), SQLITE_OK);
  const std::string sql = "UPDATE jobs SET job = x'deadbeef00ff' WHERE id = '" + j.id() + "'";
  ASSERT_EQ(sqlite3_exec(db, sql.c_str(), nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(db);
  End(j.id(), kOom);
  core_->tick();
  const v1::Job k = Get(j.id());
  EXPECT_EQ(k.state(), v1::FAILED);
  EXPECT_EQ(k.failure().reason(), store::kCorruptRecord);
  EXPECT_EQ(launcher_.launches.size(), 1u);
  EXPECT_EQ(Reserved(), 0);
}

// A worker that reports thousands of events at once (a tiny model, or a job's owner
// writing to worker.out under Slurm's run_as: submitter): a burst is stored, then two a
// second, with one event saying so; the job's progress still follows every line, and the
// attempt's first terminal event is always stored.
TEST_F(CoreTest, AFloodOfWorkerEventsIsThinnedButProgressFollows) {
  const v1::Job j = Submit();
  core_->tick();
  for (int i = 1; i <= 5000; ++i) W(j.id()).lines.push_back(StepAt(i, 1000));
  core_->tick();
  auto count = [&](const std::string& kind) {
    const auto k = Kinds(j.id());
    return std::count(k.begin(), k.end(), kind);
  };
  EXPECT_EQ(count("step"), 100);
  EXPECT_EQ(count("events"), 1);
  EXPECT_EQ(Get(j.id()).progress().step(), 5000);
  now_ += 10'000;
  for (int i = 5001; i <= 5100; ++i) W(j.id()).lines.push_back(StepAt(i, 1000));
  core_->tick();
  EXPECT_EQ(count("step"), 120);
  EXPECT_EQ(Get(j.id()).progress().step(), 5100);
  // A flood of terminal events (the worker runs on after them): the first is stored, the
  // rest count against the budget like any other.
  for (int i = 0; i < 1000; ++i) W(j.id()).lines.push_back(R"({"event":"stopped"})");
  core_->tick();
  EXPECT_EQ(count("stopped"), 1);
  End(j.id(), kFinished);
  EXPECT_EQ(Get(j.id()).state(), v1::SUCCEEDED);  // decided by the last terminal line read
  EXPECT_EQ(count("finished"), 0);                // its event: over the budget
}

TEST_F(CoreTest, AdmissionLimits) {
  v1::SubmitJobRequest r = Request();
  r.mutable_spec()->set_name(std::string(300, 'x'));
  EXPECT_THROW(core_->submit(Caller{}, r), CoreError);
  r.mutable_spec()->set_name("bad\x1b[31m");
  try {
    core_->submit(Caller{}, r);
    ADD_FAILURE();
  } catch (const CoreError& e) {
    EXPECT_EQ(e.code, Code::kInvalidArgument);
    EXPECT_NE(std::string(e.what()).find("name"), std::string::npos);
  }
  r = Request();
  r.set_priority(1000);
  try {
    core_->submit(Caller{"alice", false}, r);
    ADD_FAILURE();
  } catch (const CoreError& e) {
    EXPECT_EQ(e.code, Code::kPermissionDenied);
    EXPECT_NE(std::string(e.what()).find("priority"), std::string::npos);
  }
  EXPECT_EQ(core_->submit(Caller{"root", true}, r).priority(), 1000);
  // Paths: outside the roots, another job's folder.
  r = Request("/etc/memfit");
  EXPECT_THROW(core_->submit(Caller{}, r), CoreError);
  r = Request(dir_ + "/out/run");
  const v1::Job first = core_->submit(Caller{}, r);
  try {
    core_->submit(Caller{}, r);
    ADD_FAILURE();
  } catch (const CoreError& e) {
    EXPECT_EQ(e.code, Code::kFailedPrecondition);
    EXPECT_NE(std::string(e.what()).find("output_dir"), std::string::npos);
  }
  r = Request();
  r.mutable_spec()->mutable_model()->set_config_path("/etc/shadow");
  try {
    core_->submit(Caller{}, r);
    ADD_FAILURE();
  } catch (const CoreError& e) {
    EXPECT_EQ(e.code, Code::kPermissionDenied);
    EXPECT_EQ(std::string(e.what()).find("root:"), std::string::npos);
  }
  EXPECT_EQ(first.name(), "t");
  EXPECT_EQ(first.spec().name(), "");  // stored once
}

TEST_F(CoreTest, AWorkerThatCannotStartFailsAsSystem) {
  launcher_.fail_next = true;
  const v1::Job j = Submit();
  core_->tick();
  const v1::Job k = Get(j.id());
  EXPECT_EQ(k.state(), v1::FAILED);
  EXPECT_EQ(k.failure().kind(), v1::SYSTEM);
  EXPECT_NE(k.failure().message().find("no such binary"), std::string::npos);
  EXPECT_EQ(Reserved(), 0);
}

// submit --after: a queued job with an unfinished dependency is not placed; it is placed
// once that job succeeded, and cancelled with the reason when it failed or was cancelled.
TEST_F(CoreTest, AfterWaitsForTheOtherJobToSucceed) {
  const v1::Job a = Submit();
  v1::SubmitJobRequest r = Request();
  r.set_after(a.id());
  const v1::Job b = core_->submit(Caller{}, r);
  EXPECT_EQ(b.state(), v1::QUEUED);
  EXPECT_EQ(b.after(), a.id());
  core_->tick();
  core_->tick();
  ASSERT_EQ(launcher_.launches.size(), 1u);  // a alone, though the device has room for both
  EXPECT_EQ(launcher_.launches[0].job_id, a.id());
  EXPECT_EQ(Get(b.id()).state(), v1::QUEUED);
  End(a.id(), kFinished);  // a succeeds in this tick; b is released and placed in the next
  core_->tick();
  ASSERT_EQ(launcher_.launches.size(), 2u);
  EXPECT_EQ(launcher_.launches[1].job_id, b.id());
  EXPECT_EQ(Get(b.id()).state(), v1::RUNNING);
  const auto kinds = Kinds(b.id());
  EXPECT_NE(std::find(kinds.begin(), kinds.end(), "after"), kinds.end());
  End(b.id(), kFinished);
  EXPECT_EQ(Get(b.id()).state(), v1::SUCCEEDED);
  // after a job that already succeeded: queued as any other
  const v1::Job c = core_->submit(Caller{}, r);
  core_->tick();
  EXPECT_EQ(Get(c.id()).state(), v1::RUNNING);
}

TEST_F(CoreTest, AfterAFailedOrCancelledJobIsCancelledWithTheReason) {
  const v1::Job a = Submit();
  v1::SubmitJobRequest r = Request();
  r.set_after(a.id());
  const v1::Job b = core_->submit(Caller{}, r);
  r.set_after(b.id());
  const v1::Job c = core_->submit(Caller{}, r);  // a chain: c after b after a
  core_->tick();
  End(a.id(), R"({"event":"failed","reason":"bad_input","message":"no such file"})");
  EXPECT_EQ(Get(a.id()).state(), v1::FAILED);
  core_->tick();
  const v1::Job gb = Get(b.id());
  EXPECT_EQ(gb.state(), v1::CANCELLED);
  EXPECT_EQ(gb.failure().reason(), "after");
  EXPECT_NE(gb.failure().message().find("job " + a.id() + ", which this job waited for (after), failed"),
            std::string::npos) << gb.failure().message();
  EXPECT_TRUE(gb.has_finished_at());
  core_->tick();
  const v1::Job gc = Get(c.id());
  EXPECT_EQ(gc.state(), v1::CANCELLED);
  EXPECT_NE(gc.failure().message().find(b.id() + ", which this job waited for (after), was cancelled"),
            std::string::npos) << gc.failure().message();
  EXPECT_EQ(launcher_.launches.size(), 1u);  // neither ever ran

  // cancelled while it waits: no longer waiting, never placed
  const v1::Job d = Submit();
  r.set_after(d.id());
  const v1::Job e = core_->submit(Caller{}, r);
  EXPECT_EQ(core_->cancel(Caller{}, e.id()).state(), v1::CANCELLED);
  core_->tick();
  End(d.id(), kFinished);
  core_->tick();
  EXPECT_EQ(Get(e.id()).state(), v1::CANCELLED);
  EXPECT_EQ(launcher_.launches.size(), 2u);  // d only
}

TEST_F(CoreTest, AfterIsValidated) {
  v1::SubmitJobRequest r = Request();
  r.set_after("j0000000000000-000000");
  try {
    core_->submit(Caller{}, r);
    ADD_FAILURE();
  } catch (const CoreError& e) {
    EXPECT_EQ(e.code, Code::kInvalidArgument);
    EXPECT_STREQ(e.what(), "after: no job j0000000000000-000000");
  }
  // another user's job: refused; an admin may chain after anyone's
  const v1::Job bobs = core_->submit(Caller{"bob", false}, Request());
  r.set_after(bobs.id());
  try {
    core_->submit(Caller{"alice", false}, r);
    ADD_FAILURE();
  } catch (const CoreError& e) {
    EXPECT_EQ(e.code, Code::kPermissionDenied);
    EXPECT_NE(std::string(e.what()).find("belongs to another user"), std::string::npos);
  }
  EXPECT_EQ(core_->submit(Caller{"root", true}, r).state(), v1::QUEUED);
  // a job that already failed or was cancelled: nothing to wait for
  const v1::Job gone = Submit();
  core_->cancel(Caller{}, gone.id());
  r.set_after(gone.id());
  try {
    core_->submit(Caller{}, r);
    ADD_FAILURE();
  } catch (const CoreError& e) {
    EXPECT_EQ(e.code, Code::kFailedPrecondition);
    EXPECT_NE(std::string(e.what()).find("was cancelled; nothing to wait for"), std::string::npos) << e.what();
  }
}

TEST_F(CoreTest, AfterSurvivesARestart) {
  const v1::Job a = Submit();
  v1::SubmitJobRequest r = Request();
  r.set_after(a.id());
  const v1::Job b = core_->submit(Caller{}, r);
  core_->stop(/*graceful=*/false);
  Open();  // a is queued again, b waits again
  core_->tick();
  ASSERT_EQ(launcher_.launches.size(), 1u);
  EXPECT_EQ(launcher_.launches[0].job_id, a.id());
  End(a.id(), kFinished);
  core_->tick();
  ASSERT_EQ(launcher_.launches.size(), 2u);
  EXPECT_EQ(launcher_.launches[1].job_id, b.id());
}

// The job it waits for writes this one's inputs (a pretrain's model): not there at submit,
// so it is admitted when that job succeeded, or fails then if they are still missing.
TEST_F(CoreTest, AfterAdmitsInputsWrittenByTheJobBefore) {
  const v1::Job a = Submit();
  v1::SubmitJobRequest r = Request();
  r.set_after(a.id());
  r.mutable_spec()->mutable_model()->set_config_path(dir_ + "/in/later/config.json");
  const v1::Job b = core_->submit(Caller{}, r);
  EXPECT_EQ(b.state(), v1::QUEUED);
  EXPECT_EQ(b.plan().reserved_bytes(), 0);  // not estimated yet
  r.mutable_spec()->mutable_model()->set_config_path(dir_ + "/in/never/config.json");
  const v1::Job c = core_->submit(Caller{}, r);
  // without --after, a missing input is refused at once
  v1::SubmitJobRequest plain = r;
  plain.clear_after();
  EXPECT_THROW(core_->submit(Caller{}, plain), CoreError);
  core_->tick();
  fs::create_directories(dir_ + "/in/later");
  fs::copy_file(dir_ + "/in/config.json", dir_ + "/in/later/config.json");
  End(a.id(), kFinished);
  core_->tick();
  const v1::Job gb = Get(b.id());
  EXPECT_EQ(gb.state(), v1::RUNNING);
  EXPECT_GT(gb.plan().reserved_bytes(), 0);
  const auto kinds = Kinds(b.id());
  EXPECT_NE(std::find(kinds.begin(), kinds.end(), "estimated"), kinds.end());
  const v1::Job gc = Get(c.id());
  EXPECT_EQ(gc.state(), v1::FAILED);
  EXPECT_EQ(gc.failure().kind(), v1::USER_INPUT);
  EXPECT_EQ(gc.failure().message().rfind("when job " + a.id() + " succeeded: model.config_path", 0), 0u)
      << gc.failure().message();
}

}  // namespace
}  // namespace memfit::daemon

namespace memfit::daemon {
namespace {

const JobSeries* Exported(const Snapshot& s, const std::string& id) {
  for (const auto& j : s.jobs) {
    if (j.id == id) return &j;
  }
  return nullptr;
}

// A job shorter than the scrape interval: placed, one step and finished between two
// snapshots. Its series stay (state succeeded) for the retention, by the core's clock;
// the device's peak between the snapshots counts its reported peak.
TEST_F(CoreTest, FinishedJobsStayExportedForTheRetention) {
  cfg_.metrics_finished_retention_seconds = 600;
  Open();
  const v1::Job cancelled_in_queue = Submit();
  core_->cancel(Caller{}, cancelled_in_queue.id());
  const v1::Job j = Submit();
  EXPECT_EQ(core_->snapshot().jobs.size(), 0u);
  core_->tick();
  Snapshot s = core_->snapshot();
  ASSERT_NE(Exported(s, j.id()), nullptr);
  EXPECT_EQ(Exported(s, j.id())->state, "running");
  EXPECT_EQ(Exported(s, j.id())->model, "gpt2");
  EXPECT_EQ(Exported(s, j.id())->preset, "custom");
  EXPECT_EQ(Exported(s, j.id())->name, "t");
  W(j.id()).lines.push_back(R"({"event":"step","step":1,"total_steps":10,"loss":3.0,"memory_bytes":300,"peak_memory_bytes":900})");
  End(j.id(), kFinished);
  now_ += 13'000;
  s = core_->snapshot();
  ASSERT_EQ(s.jobs.size(), 1u);  // the job cancelled in the queue never had series
  const JobSeries* g = Exported(s, j.id());
  ASSERT_NE(g, nullptr);
  EXPECT_EQ(g->state, "succeeded");
  EXPECT_EQ(g->measured_peak, 1000);
  EXPECT_EQ(g->step, 1);
  EXPECT_EQ(g->device, "cpu:0");
  EXPECT_EQ(s.devices.at(0).peak, 1000);  // the finished event's peak, seen at the last tick
  EXPECT_EQ(s.devices.at(0).used, 0);
  EXPECT_EQ(core_->snapshot().devices.at(0).peak, 0);  // a new window
  now_ += 600'000 - 13'000 - 1;
  EXPECT_NE(Exported(core_->snapshot(), j.id()), nullptr);
  now_ += 1;
  EXPECT_EQ(Exported(core_->snapshot(), j.id()), nullptr);
  EXPECT_EQ(Exported(core_->snapshot(), j.id()), nullptr);  // forgotten, not only hidden
}

TEST_F(CoreTest, RetentionZeroExportsRunningJobsOnly) {
  cfg_.metrics_finished_retention_seconds = 0;
  Open();
  const v1::Job j = Submit();
  core_->tick();
  EXPECT_NE(Exported(core_->snapshot(), j.id()), nullptr);
  End(j.id(), kOom);  // requeued and placed again, bigger, in the same tick
  EXPECT_EQ(Exported(core_->snapshot(), j.id())->reserved, Get(j.id()).plan().reserved_bytes());
  End(j.id(), kFinished);
  EXPECT_EQ(core_->snapshot().jobs.size(), 0u);
}

TEST_F(CoreTest, TheFinishedJobCapKeepsTheNewest) {
  cfg_.metrics_finished_max_jobs = 2;
  Open();
  std::vector<std::string> ids;
  for (int i = 0; i < 3; ++i) {
    const v1::Job j = Submit();
    core_->tick();
    now_ += 1000;
    End(j.id(), kFinished);
    ids.push_back(j.id());
  }
  const Snapshot s = core_->snapshot();
  ASSERT_EQ(s.jobs.size(), 2u);
  EXPECT_EQ(s.jobs[0].id, ids[2]);
  EXPECT_EQ(s.jobs[1].id, ids[1]);
}

// CPU devices: the peak between scrapes is the sum of the running jobs' reported peaks
// (the workers report a step's peak only as their peak so far), not the bytes in use
// between steps.
TEST_F(CoreTest, CpuDevicePeakSumsTheRunningJobsReportedPeaks) {
  const v1::Job a = Submit();
  const v1::Job b = Submit();
  core_->tick();
  ASSERT_EQ(launcher_.launches.size(), 2u);
  W(a.id()).lines.push_back(R"({"event":"step","step":1,"total_steps":10,"loss":3.0,"memory_bytes":30,"peak_memory_bytes":300})");
  W(b.id()).lines.push_back(R"({"event":"step","step":1,"total_steps":10,"loss":3.0,"memory_bytes":20,"peak_memory_bytes":200})");
  core_->tick();
  Snapshot s = core_->snapshot();
  EXPECT_EQ(s.devices.at(0).used, 50);
  EXPECT_EQ(s.devices.at(0).peak, 500);
  End(a.id(), kFinished);  // peak 1000 at its end
  s = core_->snapshot();
  EXPECT_EQ(s.devices.at(0).peak, 1200);  // a (1000) + b (200), seen before a was let go
  EXPECT_EQ(s.devices.at(0).used, 20);
  EXPECT_EQ(core_->snapshot().devices.at(0).peak, 200);  // b alone now
}

}  // namespace
}  // namespace memfit::daemon
