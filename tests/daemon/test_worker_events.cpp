// Worker JSON lines -> job progress and events (server/daemon/worker_events.h).
#include "worker_events.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "runner.h"

namespace memfit::daemon {
namespace {

// A burst of 100 stored events, then 2 a second; terminal events always; a clock that
// steps back adds nothing.
TEST(WorkerEvents, EventBudget) {
  EventBudget b;
  int stored = 0;
  for (int i = 0; i < 1000; ++i) stored += TakeEvent(b, "step", 5000);
  EXPECT_EQ(stored, 100);
  EXPECT_EQ(b.dropped, 900);
  EXPECT_TRUE(TakeEvent(b, "stopped", 5000));  // the first terminal event: always
  EXPECT_FALSE(TakeEvent(b, "finished", 5000));  // a flood of them: like any other
  EXPECT_FALSE(TakeEvent(b, "failed", 5000));
  EXPECT_FALSE(TakeEvent(b, "checkpoint", 5000));
  // 10 s later: 20 more.
  stored = 0;
  for (int i = 0; i < 100; ++i) stored += TakeEvent(b, "step", 15000);
  EXPECT_EQ(stored, 20);
  // A step back in time adds nothing; time then refills from there (an hour back does
  // not silence the job for an hour).
  EXPECT_FALSE(TakeEvent(b, "step", 1000));
  EXPECT_TRUE(TakeEvent(b, "step", 2000));
  EXPECT_TRUE(TakeEvent(b, "step", 2000));
  EXPECT_FALSE(TakeEvent(b, "step", 2000));
  b.tokens = 0;
  // Before 1970 on the clock: still refills.
  EXPECT_FALSE(TakeEvent(b, "step", -60000));
  EXPECT_TRUE(TakeEvent(b, "step", -59000));
  // An hour idle refills only to the burst.
  stored = 0;
  for (int i = 0; i < 1000; ++i) stored += TakeEvent(b, "step", 15000 + 3600 * 1000);
  EXPECT_EQ(stored, 100);
}

// The worker's output read as events: only lines that begin with '{', at most kMaxLines
// a read, at most 16 MiB held, however much is written (a flood from the job's owner).
TEST(WorkerEvents, LineTailIsBoundedUnderAFlood) {
  char tmpl[] = "/tmp/memfit-tail-XXXXXX";
  const std::string dir = mkdtemp(tmpl);
  const std::string path = dir + "/worker.out";
  {
    std::ofstream o(path);
    for (int i = 0; i < 25000; ++i) o << R"({"event":"step","step":)" << i << "}\n";
    o << std::string(3 << 20, '\n');  // three million empty lines
    o << "not an event\n" << R"({"event":"finished"})" << "\n" << "partial";
  }
  LineTail t(path, 0);
  std::vector<size_t> sizes;
  std::string last;
  for (int k = 0; k < 10; ++k) {
    const auto lines = t.read();
    sizes.push_back(lines.size());
    if (!lines.empty()) last = lines.back();
  }
  EXPECT_EQ(sizes[0], LineTail::kMaxLines);
  EXPECT_EQ(sizes[1], LineTail::kMaxLines);
  EXPECT_EQ(sizes[2], 5001u);  // the rest of the steps and the finished line
  EXPECT_EQ(sizes[3], 0u);
  EXPECT_EQ(last, R"({"event":"finished"})");
  // Every complete line is consumed; the partial one waits.
  EXPECT_EQ(t.offset(), static_cast<int64_t>(std::filesystem::file_size(path)) - 7);
  // More than 16 MiB of lines that are not events before the last one: a read can hand
  // out nothing yet consume (so an ended worker is drained while the offset moves).
  const std::string junk = dir + "/junk.out";
  {
    std::ofstream o(junk);
    for (int i = 0; i < (17 << 16); ++i) o << "warning: not json\n";  // 17 x 64 Ki lines, 18 B each
    o << R"({"event":"finished"})" << "\n";
  }
  LineTail u(junk, 0);
  const auto first = u.read();
  EXPECT_TRUE(first.empty());
  EXPECT_GT(u.offset(), 0);
  std::vector<std::string> rest;
  for (int k = 0; k < 3 && rest.empty(); ++k) rest = u.read();
  EXPECT_EQ(rest, std::vector<std::string>{R"({"event":"finished"})"});
  // Blanks or a UTF-8 BOM before the '{' (the JSON parser skips both) keep a line.
  const std::string padded = dir + "/padded.out";
  std::ofstream(padded) << "  \t{\"a\":1}\n\xEF\xBB\xBF{\"b\":2}\n  x{\n\xEF\xBB\xBF\n";
  LineTail p(padded, 0);
  EXPECT_EQ(p.read(), (std::vector<std::string>{"  \t{\"a\":1}", "\xEF\xBB\xBF{\"b\":2}"}));
  std::filesystem::remove_all(dir);
}

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
  // Sizes at most 2^48: the reports of many workers are added up.
  ASSERT_TRUE(ApplyWorkerLine(R"({"event":"step","step":1,"memory_bytes":9223372036854775807,"peak_memory_bytes":1e300})", j, a));
  EXPECT_EQ(j.progress().memory_bytes(), int64_t{1} << 48);
  EXPECT_EQ(a.reported_peak, int64_t{1} << 48);
  ASSERT_TRUE(ApplyWorkerLine(R"({"event":"step","step":2,"memory_bytes":-1e300,"activation_bytes":12.7})", j, a));
  EXPECT_EQ(j.progress().memory_bytes(), 0);
  EXPECT_EQ(j.progress().activation_bytes(), 12);
  ASSERT_TRUE(ApplyWorkerLine(R"({"event":"finished","output":"not an object","eval":7})", j, a));
  EXPECT_EQ(a.terminal, "finished");
}

}  // namespace
}  // namespace memfit::daemon
