// The job state machine's decisions (server/daemon/decide.h): every outcome of an attempt
// against every budget, no processes.
#include "runner.h"
#include "decide.h"

#include <gtest/gtest.h>

namespace memfit::daemon {
namespace {

using Action = Decision::Action;
using Ended = Outcome::Ended;
constexpr int64_t MiB = int64_t{1} << 20;

sched::ReservationPolicy Reservations(int oom_retries = 2) {
  sched::ReservationPolicy p;
  p.oom_growth = 1.25;
  p.max_oom_retries = oom_retries;
  return p;
}

JobFacts Running(int ooms = 0, int crashes = 0, int64_t reserved = 100 * MiB) {
  return JobFacts{v1::RUNNING, ooms, crashes, reserved, 1000 * MiB};
}

Outcome Failed(const std::string& reason, const std::string& message = "m") {
  Outcome o;
  o.ended = Ended::kFailed;
  o.reason = reason;
  o.message = message;
  return o;
}

Outcome Ended_(Ended e) {
  Outcome o;
  o.ended = e;
  return o;
}

Outcome Killed(int signal) {
  Outcome o;
  o.ended = Ended::kNoResult;
  o.signal = signal;
  return o;
}

TEST(Decide, FinishedSucceeds) {
  const Decision d = Decide(Running(), Ended_(Ended::kFinished), Reservations(), RetryPolicy{});
  EXPECT_EQ(d.action, Action::kSucceed);
  EXPECT_EQ(d.message, "succeeded");
}

TEST(Decide, OutOfMemoryRetriesBiggerFromItsOwnBudget) {
  const Decision d = Decide(Running(0, 0), Failed("oom"), Reservations(), RetryPolicy{});
  EXPECT_EQ(d.action, Action::kRequeue);
  EXPECT_EQ(d.reservation_bytes, 125 * MiB);
  EXPECT_TRUE(d.used_oom_retry);
  EXPECT_FALSE(d.used_crash_retry);
  EXPECT_TRUE(d.oom_lower_bound);
  EXPECT_EQ(d.event_kind, "oom");
  EXPECT_NE(d.message.find("retry 1 of 2"), std::string::npos) << d.message;
}

TEST(Decide, OutOfMemoryAfterTheRetriesFailsAsSystem) {
  const Decision d = Decide(Running(2, 0), Failed("oom"), Reservations(2), RetryPolicy{});
  EXPECT_EQ(d.action, Action::kFail);
  EXPECT_EQ(d.failure_kind, v1::SYSTEM);
  EXPECT_EQ(d.reason, "oom");
  EXPECT_TRUE(d.oom_lower_bound);
}

TEST(Decide, CrashesDoNotUseTheOutOfMemoryBudget) {
  // Two crashes already: the out-of-memory retries are all still there.
  const Decision d = Decide(Running(0, 2), Failed("oom"), Reservations(2), RetryPolicy{2});
  EXPECT_EQ(d.action, Action::kRequeue);
  EXPECT_TRUE(d.used_oom_retry);
}

TEST(Decide, OutOfMemoryRetriesDoNotUseTheCrashBudget) {
  const Decision d = Decide(Running(2, 0), Killed(9), Reservations(2), RetryPolicy{2});
  EXPECT_EQ(d.action, Action::kRequeue);
  EXPECT_TRUE(d.used_crash_retry);
  EXPECT_FALSE(d.used_oom_retry);
  EXPECT_EQ(d.reservation_bytes, 100 * MiB);  // a crash keeps the reservation
}

TEST(Decide, ACrashNamesTheSignalAndRetriesUntilTheBudgetIsSpent) {
  Decision d = Decide(Running(0, 0), Killed(9), Reservations(), RetryPolicy{2});
  EXPECT_EQ(d.action, Action::kRequeue);
  EXPECT_NE(d.message.find("killed by signal 9 (SIGKILL)"), std::string::npos) << d.message;
  d = Decide(Running(0, 2), Killed(11), Reservations(), RetryPolicy{2});
  EXPECT_EQ(d.action, Action::kFail);
  EXPECT_EQ(d.failure_kind, v1::SYSTEM);
  EXPECT_EQ(d.reason, "crashed");
  EXPECT_NE(d.message.find("SIGSEGV"), std::string::npos) << d.message;
}

TEST(Decide, ZeroCrashRetriesFailsAtOnce) {
  const Decision d = Decide(Running(), Killed(6), Reservations(), RetryPolicy{0});
  EXPECT_EQ(d.action, Action::kFail);
}

TEST(Decide, ExitCodeWithoutResult) {
  Outcome o;
  o.ended = Ended::kNoResult;
  o.exit_code = 7;
  const Decision d = Decide(Running(), o, Reservations(), RetryPolicy{});
  EXPECT_NE(d.message.find("exit 7"), std::string::npos) << d.message;
}

TEST(Decide, BadInputIsTheUsersAndNotRetried) {
  const Decision d = Decide(Running(), Failed("bad_input", "data.train_path: no such file"), Reservations(), RetryPolicy{});
  EXPECT_EQ(d.action, Action::kFail);
  EXPECT_EQ(d.failure_kind, v1::USER_INPUT);
  EXPECT_EQ(d.message, "data.train_path: no such file");
}

TEST(Decide, OutputWriteFailureIsTheSystemsWithARetry) {
  Decision d = Decide(Running(), Failed("io", "/out/x.tmp: No space left on device"), Reservations(), RetryPolicy{1});
  EXPECT_EQ(d.action, Action::kRequeue);
  EXPECT_TRUE(d.used_crash_retry);
  EXPECT_NE(d.message.find("No space left"), std::string::npos);
  d = Decide(Running(0, 1), Failed("io", "disk full"), Reservations(), RetryPolicy{1});
  EXPECT_EQ(d.action, Action::kFail);
  EXPECT_EQ(d.failure_kind, v1::SYSTEM);
  EXPECT_EQ(d.reason, "io");
}

TEST(Decide, InternalErrorFailsAsSystem) {
  const Decision d = Decide(Running(), Failed("internal", "bug"), Reservations(), RetryPolicy{});
  EXPECT_EQ(d.action, Action::kFail);
  EXPECT_EQ(d.failure_kind, v1::SYSTEM);
  EXPECT_EQ(d.reason, "internal");
}

TEST(Decide, UnaskedStopUsesTheCrashBudget) {
  const Decision d = Decide(Running(0, 0), Ended_(Ended::kStopped), Reservations(), RetryPolicy{2});
  EXPECT_EQ(d.action, Action::kRequeue);
  EXPECT_TRUE(d.used_crash_retry);
}

TEST(Decide, DaemonStoppingRequeuesWithoutABudget) {
  for (Ended e : {Ended::kStopped, Ended::kNoResult}) {
    Outcome o = Ended_(e);
    o.daemon_stopping = true;
    const Decision d = Decide(Running(2, 2), o, Reservations(2), RetryPolicy{2});
    EXPECT_EQ(d.action, Action::kRequeue);
    EXPECT_FALSE(d.used_crash_retry);
    EXPECT_FALSE(d.used_oom_retry);
    EXPECT_EQ(d.reservation_bytes, 100 * MiB);
  }
}

TEST(Decide, CancellingWinsOverEveryOutcomeButAFinishedRun) {
  JobFacts f = Running();
  f.state = v1::CANCELLING;
  for (const Outcome& o : {Failed("oom"), Failed("bad_input"), Killed(9), Ended_(Ended::kStopped)}) {
    EXPECT_EQ(Decide(f, o, Reservations(), RetryPolicy{}).action, Action::kCancel);
  }
  const Decision d = Decide(f, Ended_(Ended::kFinished), Reservations(), RetryPolicy{});
  EXPECT_EQ(d.action, Action::kSucceed);
  EXPECT_NE(d.message.find("before the cancel"), std::string::npos);
}

TEST(Decide, OutOfMemoryAtTheLargestDeviceGetsOneWholeDeviceTry) {
  JobFacts f = Running(0, 0, 900 * MiB);
  Decision d = Decide(f, Failed("oom"), Reservations(), RetryPolicy{});
  EXPECT_EQ(d.action, Action::kRequeue);
  EXPECT_EQ(d.reservation_bytes, 1000 * MiB);
  f.reservation_bytes = 1000 * MiB;
  f.oom_retries_used = 1;
  d = Decide(f, Failed("oom"), Reservations(), RetryPolicy{});
  EXPECT_EQ(d.action, Action::kFail);
}

TEST(DescribeExit, Words) {
  EXPECT_EQ(DescribeExit(3, 0), "exit 3");
  EXPECT_EQ(DescribeExit(-1, 15), "killed by signal 15 (SIGTERM)");
  EXPECT_NE(DescribeExit(-1, 0).find("unknown"), std::string::npos);
}

TEST(DecideAfter, WaitReleaseOrCancel) {
  v1::Job a;
  a.set_id("j1");
  for (auto st : {v1::QUEUED, v1::RUNNING, v1::CANCELLING}) {
    a.set_state(st);
    EXPECT_EQ(DecideAfter("j1", a).action, AfterDecision::Action::kWait);
  }
  a.set_state(v1::SUCCEEDED);
  EXPECT_EQ(DecideAfter("j1", a).action, AfterDecision::Action::kRelease);
  a.set_state(v1::FAILED);
  a.mutable_failure()->set_message("out of memory");
  const AfterDecision f = DecideAfter("j1", a);
  EXPECT_EQ(f.action, AfterDecision::Action::kCancel);
  EXPECT_EQ(f.message, "job j1, which this job waited for (after), failed: out of memory");
  a.set_state(v1::CANCELLED);
  EXPECT_EQ(DecideAfter("j1", a).message, "job j1, which this job waited for (after), was cancelled");
  EXPECT_EQ(DecideAfter("j1", std::nullopt).action, AfterDecision::Action::kCancel);
}

}  // namespace
}  // namespace memfit::daemon

// An inherited CUDA_VISIBLE_DEVICES (memfitd started under one) must not override the GPU
// memfitd placed the job on: getenv returns the first of two entries.
TEST(MergeEnv, PlacementReplacesInheritedValues) {
  const std::vector<std::string> base = {"PATH=/usr/bin", "CUDA_VISIBLE_DEVICES=3", "HOME=/root",
                                         "CUDA_VISIBLE_DEVICES_X=keep"};
  const auto env = memfit::daemon::merge_env(base, {"CUDA_VISIBLE_DEVICES=1", "CUDA_DEVICE_ORDER=PCI_BUS_ID"});
  const std::vector<std::string> want = {"PATH=/usr/bin", "HOME=/root", "CUDA_VISIBLE_DEVICES_X=keep",
                                         "CUDA_VISIBLE_DEVICES=1", "CUDA_DEVICE_ORDER=PCI_BUS_ID"};
  EXPECT_EQ(env, want);
  EXPECT_EQ(memfit::daemon::merge_env(base, {}), base);
}
