// The placement core with an injected clock: packing, best fit, priorities and FIFO,
// backfill with a drain for a starving job, admission, release, recovery, reservations.
#include <gtest/gtest.h>

#include <cmath>
#include <stdexcept>

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

TEST(Scheduler, PacksJobsWhileTheyFitAndPicksTheTightestDevice) {
  Scheduler s({{"cuda:0", 80 * GiB}, {"cuda:1", 40 * GiB}}, {});
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
  Options o;
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
