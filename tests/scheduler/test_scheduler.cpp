// The placement core with an injected clock: packing, best fit, priorities and FIFO,
// backfill with a drain for a starving job, admission, release, recovery, reservations.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <map>
#include <random>
#include <set>
#include <stdexcept>

#include "compute_model.h"
#include "scheduler.h"

namespace {

using memfit::sched::Device;
using memfit::sched::Options;
using memfit::sched::Placement;
using memfit::sched::QueuedJob;
using memfit::sched::ReservationPolicy;
using memfit::sched::Scheduler;

constexpr int64_t GiB = int64_t{1} << 30;

std::vector<std::string> ids(const std::vector<Placement>& p) {
  std::vector<std::string> out;
  for (const auto& x : p) out.push_back(x.job_id + "@" + x.device);
  return out;
}

Options best_fit() {
  Options o;
  o.placement = memfit::sched::PlacementPolicy::kBestFit;
  return o;
}

TEST(Scheduler, PacksJobsWhileTheyFitAndPicksTheTightestDevice) {
  Scheduler s({{"cuda:0", 80 * GiB}, {"cuda:1", 40 * GiB}}, best_fit());
  s.enqueue({"a", "u", 0, 0, 30 * GiB});
  s.enqueue({"b", "u", 0, 1, 30 * GiB});
  s.enqueue({"c", "u", 0, 2, 30 * GiB});
  s.enqueue({"d", "u", 0, 3, 30 * GiB});
  // Best fit: a goes to the 40 GiB device (10 left) rather than the 80 (50 left); b and c
  // share the 80 GiB one; d waits.
  EXPECT_EQ(ids(s.schedule(10)), (std::vector<std::string>{"a@cuda:1", "b@cuda:0", "c@cuda:0"}));
  EXPECT_EQ(s.reserved_bytes("cuda:0"), 60 * GiB);
  EXPECT_EQ(s.jobs_on("cuda:0"), (std::vector<std::string>{"b", "c"}));
  EXPECT_EQ(s.queue_length(), 1u);
  EXPECT_TRUE(s.schedule(11).empty());
  EXPECT_TRUE(s.release("b"));
  EXPECT_FALSE(s.release("b"));
  EXPECT_EQ(ids(s.schedule(12)), (std::vector<std::string>{"d@cuda:0"}));
  EXPECT_EQ(s.device_of("d"), std::optional<std::string>("cuda:0"));
}

TEST(Scheduler, PriorityFirstThenFifo) {
  Scheduler s({{"cpu:0", 10 * GiB}}, {});
  s.enqueue({"old-low", "u", 0, 0, 6 * GiB});
  s.enqueue({"new-high", "u", 5, 100, 6 * GiB});
  s.enqueue({"mid-low", "u", 0, 50, 6 * GiB});
  EXPECT_EQ(ids(s.schedule(200)), (std::vector<std::string>{"new-high@cpu:0"}));
  s.release("new-high");
  EXPECT_EQ(ids(s.schedule(201)), (std::vector<std::string>{"old-low@cpu:0"}));
  s.release("old-low");
  EXPECT_EQ(ids(s.schedule(202)), (std::vector<std::string>{"mid-low@cpu:0"}));
}

TEST(Scheduler, BackfillsSmallJobsUntilTheBigOneStarvesThenDrainsADevice) {
  Options o = best_fit();
  o.starvation_ms = 1000;
  Scheduler s({{"cuda:0", 80 * GiB}, {"cuda:1", 80 * GiB}}, o);
  s.enqueue({"x0", "u", 0, 0, 50 * GiB});
  s.enqueue({"x1", "u", 0, 0, 50 * GiB});
  EXPECT_EQ(s.schedule(0).size(), 2u);  // one on each device, 30 GiB free on each
  s.enqueue({"big", "u", 0, 10, 60 * GiB});
  s.enqueue({"small1", "u", 0, 20, 20 * GiB});
  s.enqueue({"small2", "u", 0, 30, 20 * GiB});
  // The big job cannot start; the small ones behind it backfill.
  EXPECT_EQ(ids(s.schedule(100)), (std::vector<std::string>{"small1@cuda:0", "small2@cuda:1"}));
  EXPECT_FALSE(s.draining());
  s.enqueue({"small3", "u", 0, 40, 5 * GiB});
  // Past the starvation limit the device with the most free memory drains for it: no
  // new job starts there; others still backfill elsewhere.
  const auto p = s.schedule(2000);
  ASSERT_TRUE(s.draining());
  const std::string drained = s.draining()->first;
  EXPECT_EQ(s.draining()->second, "big");
  // small3 still backfills, on the device that is not drained (a drain that blocked
  // every device would place nothing, and a loop over an empty result proves nothing).
  ASSERT_EQ(p.size(), 1u);
  EXPECT_EQ(p[0].job_id, "small3");
  EXPECT_NE(p[0].device, drained);
  // When the drained device's jobs are gone, the big job starts there.
  for (const auto& id : s.jobs_on(drained)) s.release(id);
  EXPECT_EQ(ids(s.schedule(3000)), (std::vector<std::string>{"big@" + drained}));
  EXPECT_FALSE(s.draining());
}

TEST(Scheduler, AdmissionRemovalAndRecovery) {
  Scheduler s({{"cpu:0", 8 * GiB}, {"cpu:1", 8 * GiB}}, {});
  EXPECT_TRUE(s.fits_alone(8 * GiB));
  EXPECT_FALSE(s.fits_alone(8 * GiB + 1));
  EXPECT_THROW(s.enqueue({"huge", "u", 0, 0, 9 * GiB}), std::invalid_argument);
  EXPECT_THROW(s.enqueue({"zero", "u", 0, 0, 0}), std::invalid_argument);
  s.enqueue({"q", "u", 0, 0, 4 * GiB});
  EXPECT_THROW(s.enqueue({"q", "u", 0, 1, 4 * GiB}), std::invalid_argument);
  EXPECT_TRUE(s.remove_queued("q"));
  EXPECT_FALSE(s.remove_queued("q"));
  EXPECT_TRUE(s.schedule(5).empty());
  // A running job found again after a restart keeps its reservation.
  s.adopt("r", "cpu:1", 6 * GiB);
  EXPECT_EQ(s.reserved_bytes("cpu:1"), 6 * GiB);
  s.enqueue({"n", "u", 0, 10, 5 * GiB});
  EXPECT_EQ(ids(s.schedule(11)), (std::vector<std::string>{"n@cpu:0"}));
  EXPECT_THROW(s.adopt("r", "cpu:0", GiB), std::invalid_argument);
}

TEST(Scheduler, LongQueuesCostNothingWhenNothingFits) {
  Scheduler s({{"cuda:0", 80 * GiB}}, {});
  s.enqueue({"fill", "u", 0, 0, 79 * GiB});
  for (int i = 0; i < 10000; ++i) s.enqueue({"j" + std::to_string(i), "u", 0, i + 1, 2 * GiB});
  EXPECT_EQ(s.schedule(1).size(), 1u);
  EXPECT_TRUE(s.schedule(2).empty());
  EXPECT_EQ(s.queue_length(), 10000u);
}

// Compute-aware placement (the default): an idle device first, so that two jobs do not
// share one GPU's compute while another GPU idles.
TEST(Spread, AnIdleDeviceFirstThenTheLeastCommittedCompute) {
  Scheduler s({{"cuda:0", 80 * GiB}, {"cuda:1", 80 * GiB}}, {});
  s.enqueue({"a", "u", 0, 0, 10 * GiB});
  EXPECT_EQ(ids(s.schedule(1)), (std::vector<std::string>{"a@cuda:0"}));
  s.enqueue({"b", "u", 0, 2, 10 * GiB});
  // Best fit would put b beside a (70 GiB left there against 80); cuda:1 is idle.
  EXPECT_EQ(ids(s.schedule(3)), (std::vector<std::string>{"b@cuda:1"}));
  EXPECT_DOUBLE_EQ(s.committed_compute("cuda:0"), 1.0);
  // Both busy with one whole-device job each: c shares one; the tie goes to best fit.
  s.enqueue({"c", "u", 0, 4, 30 * GiB});
  const auto p = s.schedule(5);
  ASSERT_EQ(p.size(), 1u);
  EXPECT_DOUBLE_EQ(s.committed_compute(p[0].device), 2.0);
  // Four jobs submitted together, as the demo does, on two idle devices: two on each.
  Scheduler t({{"cpu:0", 8 * GiB}, {"cpu:1", 8 * GiB}}, {});
  for (int i = 0; i < 4; ++i) t.enqueue({"d" + std::to_string(i), "u", 0, i, GiB});
  t.schedule(10);
  EXPECT_EQ(t.jobs_on("cpu:0").size(), 2u);
  EXPECT_EQ(t.jobs_on("cpu:1").size(), 2u);
}

TEST(Spread, LearnedComputeLetsSmallJobsShareWithoutSlowingAnyone) {
  Scheduler s({{"cuda:0", 80 * GiB}, {"cuda:1", 80 * GiB}}, {});
  s.enqueue({"light", "u", 0, 0, 10 * GiB, 0.3});
  s.enqueue({"heavy", "u", 0, 1, 10 * GiB, 1.0});
  s.schedule(2);  // one on each device
  const std::string light_dev = *s.device_of("light");
  EXPECT_NE(light_dev, *s.device_of("heavy"));
  // A job using half a device: beside the light one the device stays within its compute
  // (0.8), beside the heavy one it would slow both down.
  s.enqueue({"half", "u", 0, 3, 10 * GiB, 0.5});
  EXPECT_EQ(ids(s.schedule(4)), (std::vector<std::string>{"half@" + light_dev}));
  EXPECT_NEAR(s.committed_compute(light_dev), 0.8, 1e-12);
  // What the daemon learns while a job runs moves its device's committed compute.
  EXPECT_TRUE(s.set_compute("heavy", 0.25));
  EXPECT_NEAR(s.committed_compute(*s.device_of("heavy")), 0.25, 1e-12);
  EXPECT_FALSE(s.set_compute("heavy", 0.0));
  EXPECT_FALSE(s.set_compute("nobody", 0.5));
  s.release("light");
  s.release("half");
  EXPECT_EQ(s.committed_compute(light_dev), 0.0);
  // Compute outside (0, 1] is refused, naming the job.
  try {
    s.enqueue({"bad", "u", 0, 5, GiB, 1.5});
    FAIL() << "compute 1.5 accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("bad"), std::string::npos);
  }
  EXPECT_THROW(s.enqueue({"zero", "u", 0, 5, GiB, 0.0}), std::invalid_argument);
  EXPECT_THROW(s.enqueue({"nan", "u", 0, 5, GiB, std::nan("")}), std::invalid_argument);
}

TEST(Spread, PacksWhenSpreadingWouldTakeTheRoomAWaitingJobNeeds) {
  Scheduler s({{"cuda:0", 80 * GiB}, {"cuda:1", 80 * GiB}}, {});
  s.adopt("x", "cuda:0", 50 * GiB);
  s.enqueue({"small", "u", 0, 0, 20 * GiB});
  s.enqueue({"big", "u", 0, 1, 70 * GiB});
  // Spreading small onto the idle cuda:1 would leave 60 GiB there and 30 here: big (70)
  // could not start. Packing small beside x keeps cuda:1 whole for big.
  EXPECT_EQ(ids(s.schedule(2)), (std::vector<std::string>{"small@cuda:0", "big@cuda:1"}));
  // A waiting job that fits nowhere yet: small jobs keep off the emptiest device.
  Scheduler t({{"cuda:0", 80 * GiB}, {"cuda:1", 80 * GiB}}, {});
  t.adopt("y0", "cuda:0", 40 * GiB);
  t.adopt("y1", "cuda:1", 20 * GiB);
  t.enqueue({"huge", "u", 0, 0, 75 * GiB});
  t.enqueue({"tiny", "u", 0, 1, 5 * GiB});
  EXPECT_EQ(ids(t.schedule(2)), (std::vector<std::string>{"tiny@cuda:0"}));
}

// Seeded random sweep: random devices, running jobs and one queued job. Invariants: no
// device ever holds more than its memory; a lone queued job that fits an idle device
// starts on an idle device; best fit picks the tightest device that fits.
TEST(Spread, RandomSweepKeepsMemoryAndPrefersIdleDevices) {
  std::mt19937_64 rng(20261204);
  std::uniform_int_distribution<int> ndev(1, 6), gib(1, 80), njobs(0, 8);
  int idle_choices = 0;
  for (int round = 0; round < 3000; ++round) {
    std::vector<Device> devs;
    const int n = ndev(rng);
    for (int d = 0; d < n; ++d) devs.push_back({"cuda:" + std::to_string(d), gib(rng) * GiB});
    Options o;
    if (round % 2) o = best_fit();
    Scheduler s(devs, o);
    const int running = njobs(rng);
    for (int k = 0; k < running; ++k) {
      const int64_t r = gib(rng) * GiB / 4;
      const double c = std::uniform_real_distribution<double>(0.05, 1.0)(rng);
      if (s.fits_alone(r)) s.enqueue({"r" + std::to_string(k), "u", 0, k, r, c});
    }
    s.schedule(100);
    // Whatever did not start leaves the queue (a lone job is the case under test).
    for (int k = 0; k < running; ++k) s.remove_queued("r" + std::to_string(k));
    const int64_t want = gib(rng) * GiB / 2;
    if (!s.fits_alone(want)) continue;
    s.enqueue({"q", "u", 0, 1000, want});
    std::map<std::string, int64_t> free_before;
    std::set<std::string> idle_fitting;
    for (const auto& d : devs) {
      free_before[d.name] = d.total_bytes - s.reserved_bytes(d.name);
      if (s.jobs_on(d.name).empty() && d.total_bytes >= want) idle_fitting.insert(d.name);
    }
    const auto p = s.schedule(200);
    for (const auto& d : devs) ASSERT_LE(s.reserved_bytes(d.name), d.total_bytes) << "round " << round;
    if (p.empty()) {
      for (const auto& [name, f] : free_before) ASSERT_LT(f, want) << "round " << round << ": " << name << " had room";
      continue;
    }
    ASSERT_EQ(p.size(), 1u);
    const std::string& got = p[0].device;
    ASSERT_GE(free_before[got], want);
    if (o.placement == memfit::sched::PlacementPolicy::kBestFit) {
      for (const auto& [name, f] : free_before) {
        if (f >= want) {
          ASSERT_GE(f, free_before[got]) << "round " << round << ": best fit skipped " << name;
        }
      }
    } else if (!idle_fitting.empty()) {
      ASSERT_TRUE(idle_fitting.count(got)) << "round " << round << ": " << got << " is busy, an idle device fitted";
      ++idle_choices;
    }
  }
  EXPECT_GT(idle_choices, 300);  // the sweep exercised the case it checks
}

TEST(ComputeModel, SlowdownAndComputeShareFromThroughput) {
  memfit::sched::ComputeModel m;
  EXPECT_EQ(m.compute("k"), 1.0);  // unknown: a whole device
  for (int i = 0; i < 3; ++i) m.observe("k", 1000.0, 1);
  EXPECT_EQ(m.compute("k"), 1.0);  // never seen shared
  m.observe("k", 600.0, 3);
  m.observe("k", 600.0, 3);
  EXPECT_EQ(m.stats("k")->slowdown(), 0.0);  // fewer than kMinSteps shared steps
  m.observe("k", 600.0, 3);
  // 1000 / 600 slower beside two others: u = (5/3) / 3.
  EXPECT_NEAR(m.stats("k")->slowdown(), 1000.0 / 600.0, 1e-12);
  EXPECT_NEAR(m.compute("k"), 5.0 / 9.0, 1e-12);
  // No slowdown at all beside three others: at most a quarter each.
  for (int i = 0; i < 3; ++i) m.observe("light", 50.0, 1);
  for (int i = 0; i < 3; ++i) m.observe("light", 51.0, 4);
  EXPECT_NEAR(m.compute("light"), 0.25, 1e-12);
  // Tiny shares are floored; nonsense is ignored.
  for (int i = 0; i < 3; ++i) m.observe("tiny", 10.0, 1);
  for (int i = 0; i < 3; ++i) m.observe("tiny", 10.0, 64);
  EXPECT_EQ(m.compute("tiny"), memfit::sched::ComputeModel::kMinCompute);
  const auto before = *m.stats("k");
  m.observe("k", -1.0, 1);
  m.observe("k", std::nan(""), 1);
  m.observe("k", std::numeric_limits<double>::infinity(), 2);
  m.observe("k", 10.0, 0);
  m.observe("", 10.0, 1);
  EXPECT_EQ(m.stats("k")->solo_steps, before.solo_steps);
  EXPECT_EQ(m.stats("k")->shared_steps, before.shared_steps);
  EXPECT_EQ(m.kinds().count(""), 0u);
  // The running mean follows a change (a new GPU, a new driver) within tens of steps.
  for (int i = 0; i < 100; ++i) m.observe("k", 2000.0, 1);
  EXPECT_GT(m.stats("k")->solo_rate, 1990.0);
}

// A kind not learned yet borrows an upper bound from the learned kind of its family (same
// name up to the trailing |BxL) nearest in shape: that kind's share scaled by how many
// times its work per step the new shape can do at most (B L linear, B L^2 attention).
TEST(ComputeModel, UnlearnedKindsAreBoundedByTheirNearestRelative) {
  memfit::sched::ComputeModel m;
  auto learn = [&m](const std::string& kind, double u) {  // throughput of a job using u alone
    for (int i = 0; i < 3; ++i) m.observe(kind, 100.0, 1);
    for (int i = 0; i < 3; ++i) m.observe(kind, 100.0 / (20.0 * u), 20);  // 20 jobs: 20u x slower
  };
  learn("gpt2|lora|bf16|8x512", 0.4);
  learn("gpt2|lora|bf16|2x1024", 0.3);
  EXPECT_NEAR(m.compute("gpt2|lora|bf16|8x512"), 0.4, 1e-12);
  // Less work than its nearest relative (8x512): that relative's share.
  EXPECT_NEAR(m.compute("gpt2|lora|bf16|4x256"), 0.4, 1e-12);
  // Nearest is 2x1024: 1.5 x its work.
  EXPECT_NEAR(m.compute("gpt2|lora|bf16|3x1024"), 0.45, 1e-12);
  // Twice the batch of 8x512: twice its share.
  EXPECT_NEAR(m.compute("gpt2|lora|bf16|16x512"), 0.8, 1e-12);
  // Twice the length: up to four times the attention work, so 1.6, capped at one device
  // (a bound linear in tokens alone would have said 0.8).
  EXPECT_EQ(m.compute("gpt2|lora|bf16|8x1024"), 1.0);
  // As many tokens as 8x512 in one long sequence: up to eight times the attention work.
  EXPECT_EQ(m.compute("gpt2|lora|bf16|1x4096"), 1.0);
  // Other families, a name that only starts like this family's, and names without a shape
  // borrow nothing.
  EXPECT_EQ(m.compute("gpt2|full|bf16|8x512"), 1.0);
  EXPECT_EQ(m.compute("gpt2|lora|bf1|8x512"), 1.0);
  EXPECT_EQ(m.compute("gpt2|lora|bf16|8x512|x"), 1.0);
  EXPECT_EQ(m.compute("gpt2|lora|bf16"), 1.0);
  learn("gpt2|lora|bf16|extra|4x256", 0.05);  // another family whose name has this one's as prefix
  learn("gpt2|lora|bf16x|4x256", 0.05);        // a sibling name
  EXPECT_NEAR(m.compute("gpt2|lora|bf16|4x256"), 0.4, 1e-12);
  // A member seen but not yet learned (never shared) bounds nothing: 1x128's nearest
  // learned relative is 2x1024.
  for (int i = 0; i < 3; ++i) m.observe("gpt2|lora|bf16|1x128", 100.0, 1);
  EXPECT_NEAR(m.compute("gpt2|lora|bf16|1x128"), 0.3, 1e-12);
  // Equally near relatives: the larger bound (0.2 x 2 against 0.5).
  learn("vit|full|fp32|1x197", 0.2);
  learn("vit|full|fp32|4x197", 0.5);
  EXPECT_NEAR(m.compute("vit|full|fp32|2x197"), 0.5, 1e-12);
  const auto shape = memfit::sched::SplitComputeKind("a|b|3x7");
  ASSERT_TRUE(shape);
  EXPECT_EQ(shape->family, "a|b");
  EXPECT_EQ(shape->batch, 3.0);
  EXPECT_EQ(shape->length, 7.0);
  for (const char* bad : {"a|3x", "a|x7", "a|3y7", "3x7", "a|-3x7", "a|0x7", "a|3x7x1", "a|1234567890x1", "a|3x7 "}) {
    EXPECT_FALSE(memfit::sched::SplitComputeKind(bad)) << bad;
  }
}

// memfitd keeps what was learned across restarts: restored stats give the same share, and
// count as recently seen; nonsense from a damaged store is ignored.
TEST(ComputeModel, RestoresWhatWasLearned) {
  memfit::sched::ComputeModel m;
  for (int i = 0; i < 3; ++i) m.observe("k|1x1", 1000.0, 1);
  for (int i = 0; i < 3; ++i) m.observe("k|1x1", 600.0, 3);
  memfit::sched::ComputeModel r;
  r.restore("k|1x1", *m.stats("k|1x1"));
  EXPECT_NEAR(r.compute("k|1x1"), 5.0 / 9.0, 1e-12);
  EXPECT_EQ(r.compute("k|2x1"), 1.0);  // twice a relative's work: 10/9, capped
  // Learning goes on from there.
  r.observe("k|1x1", 1000.0, 1);
  EXPECT_EQ(r.stats("k|1x1")->solo_steps, 4);
  memfit::sched::ComputeModel::Stats bad = *m.stats("k|1x1");
  bad.shared_rate = std::nan("");
  r.restore("bad1|1x1", bad);
  bad = *m.stats("k|1x1");
  bad.solo_steps = -1;
  r.restore("bad2|1x1", bad);
  bad = *m.stats("k|1x1");
  bad.shared_jobs = 0.5;
  r.restore("bad3|1x1", bad);
  r.restore("", *m.stats("k|1x1"));
  EXPECT_EQ(r.kinds().size(), 1u);
}

TEST(ComputeModel, BoundedKindsDropTheLeastRecentlySeen) {
  memfit::sched::ComputeModel m;
  const size_t cap = memfit::sched::ComputeModel::kMaxKinds;
  for (size_t i = 0; i < cap; ++i) m.observe("kind" + std::to_string(i), 1.0, 1);
  m.observe("kind0", 1.0, 1);  // now the most recent
  m.observe("new", 1.0, 1);
  EXPECT_EQ(m.kinds().size(), cap);
  EXPECT_TRUE(m.stats("kind0"));
  EXPECT_FALSE(m.stats("kind1"));
  EXPECT_TRUE(m.stats("new"));
}

TEST(ReservationPolicy, MarginAndBoundedRetries) {
  ReservationPolicy r;
  EXPECT_EQ(r.reserve(100 * GiB / 100), static_cast<int64_t>(std::ceil(1.08 * GiB)));
  // After an out-of-memory: 25% more, at most two retries, capped at a whole device.
  EXPECT_EQ(r.after_oom(40 * GiB, 1, 80 * GiB), 50 * GiB);
  EXPECT_EQ(r.after_oom(70 * GiB, 1, 80 * GiB), 80 * GiB);
  EXPECT_EQ(r.after_oom(80 * GiB, 1, 80 * GiB), 0);
  EXPECT_EQ(r.after_oom(40 * GiB, 3, 80 * GiB), 0);
}

}  // namespace
