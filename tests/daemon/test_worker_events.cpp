// Worker JSON lines -> job progress and events (server/daemon/worker_events.h).
#include "worker_events.h"

#include <gtest/gtest.h>

namespace memfit::daemon {
namespace {

TEST(WorkerEvents, StepUpdatesProgress) {
  v1::Job j;
  AttemptReport a;
  const auto r = ApplyWorkerLine(
      R"({"event":"step","step":3,"total_steps":10,"loss":2.5,"memory_bytes":100,"peak_memory_bytes":150})", j, a);
  ASSERT_TRUE(r);
  EXPECT_EQ(r->kind, "step");
  EXPECT_EQ(r->message, "step 3/10 loss 2.5000");
  EXPECT_EQ(j.progress().step(), 3);
  EXPECT_EQ(j.progress().peak_memory_bytes(), 150);
  EXPECT_EQ(a.steps, 1);
}

TEST(WorkerEvents, TheAttemptKeepsItsOwnMemoryReadings) {
  v1::Job j;
  j.mutable_progress()->set_peak_memory_bytes(5000);  // an earlier attempt's peak
  AttemptReport a;
  ASSERT_TRUE(ApplyWorkerLine(R"({"event":"step","step":1,"memory_bytes":100,"peak_memory_bytes":400})", j, a));
  ASSERT_TRUE(ApplyWorkerLine(R"({"event":"step","step":2,"memory_bytes":120,"peak_memory_bytes":300})", j, a));
  EXPECT_EQ(a.memory_bytes, 120);
  EXPECT_EQ(a.reported_peak, 400);
  EXPECT_EQ(j.progress().peak_memory_bytes(), 5000);  // the job's: over every attempt
  ASSERT_TRUE(ApplyWorkerLine(R"({"event":"finished","peak_memory_bytes":450})", j, a));
  EXPECT_EQ(a.reported_peak, 450);
}

TEST(WorkerEvents, FinishedAndFailedSetTheAttempt) {
  v1::Job j;
  AttemptReport a;
  ASSERT_TRUE(ApplyWorkerLine(R"({"event":"finished","peak_memory_bytes":4096,"output":{"adapter":"/o/adapter"}})", j, a));
  EXPECT_EQ(a.terminal, "finished");
  EXPECT_EQ(a.measured_peak, 4096);
  EXPECT_EQ(j.result().adapter_dir(), "/o/adapter");
  ASSERT_TRUE(ApplyWorkerLine(R"({"event":"failed","reason":"io","message":"disk full"})", j, a));
  EXPECT_EQ(a.terminal, "failed");
  EXPECT_EQ(a.fail_reason, "io");
}

TEST(WorkerEvents, HostileLinesAreBoundedOrIgnored) {
  v1::Job j;
  AttemptReport a;
  EXPECT_FALSE(ApplyWorkerLine("not json", j, a));
  EXPECT_FALSE(ApplyWorkerLine("[1,2]", j, a));
  EXPECT_FALSE(ApplyWorkerLine(R"({"event":"unknown"})", j, a));
  // Wrong types fall back instead of throwing; negative sizes are clamped.
  ASSERT_TRUE(ApplyWorkerLine(R"({"event":"step","step":"x","peak_memory_bytes":-5,"loss":"nan"})", j, a));
  EXPECT_EQ(j.progress().step(), 0);
  EXPECT_EQ(j.progress().peak_memory_bytes(), 0);
  const std::string big(100000, 'x');
  ASSERT_TRUE(ApplyWorkerLine(R"({"event":"failed","reason":"internal","message":")" + big + "\"}", j, a));
  EXPECT_EQ(a.fail_message.size(), 4096u);
  ASSERT_TRUE(ApplyWorkerLine(R"({"event":"finished","output":"not an object","eval":7})", j, a));
  EXPECT_EQ(a.terminal, "finished");
}

}  // namespace
}  // namespace memfit::daemon
