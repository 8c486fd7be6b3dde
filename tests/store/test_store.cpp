// The SQLite store: jobs and events written atomically, idempotent request ids, paging,
// workers and calibration, and a job that survives its writer dying with SIGKILL.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>

#include "store.h"

namespace {

namespace fs = std::filesystem;
using memfit::store::Store;
using memfit::store::StoreError;
namespace v1 = memfit::v1;

std::string tmpdir() {
  char tmpl[] = "/tmp/memfit-store-XXXXXX";
  return mkdtemp(tmpl);
}

v1::Job job(const std::string& id, const std::string& owner, v1::JobState st, int64_t created_s,
            const std::string& request = "") {
  v1::Job j;
  j.set_id(id);
  j.set_owner(owner);
  j.set_state(st);
  j.set_request_id(request);
  j.mutable_created_at()->set_seconds(created_s);
  j.mutable_spec()->set_name("n-" + id);
  return j;
}

v1::JobEvent event(const std::string& kind) {
  v1::JobEvent e;
  e.set_kind(kind);
  return e;
}

TEST(Store, QueuedLimitIsCheckedInTheInsert) {
  auto st = Store::open(tmpdir());
  EXPECT_TRUE(st->insert_job(job("a1", "alice", v1::QUEUED, 1), event("submitted"), 2));
  EXPECT_TRUE(st->insert_job(job("a2", "alice", v1::QUEUED, 2), event("submitted"), 2));
  EXPECT_FALSE(st->insert_job(job("a3", "alice", v1::QUEUED, 3), event("submitted"), 2));
  EXPECT_FALSE(st->get("a3"));  // nothing half-written
  EXPECT_TRUE(st->events("a3", 0, 10).empty());
  EXPECT_TRUE(st->insert_job(job("b1", "bob", v1::QUEUED, 4), event("submitted"), 2));  // per owner
  v1::Job a1 = *st->get("a1");
  a1.set_state(v1::RUNNING);  // no longer queued: room again
  st->append_event(a1, event("state"));
  EXPECT_TRUE(st->insert_job(job("a3", "alice", v1::QUEUED, 3), event("submitted"), 2));
  EXPECT_EQ(st->count(v1::QUEUED, "alice"), 2);
}

TEST(Store, JobsEventsAndRequestIds) {
  auto st = Store::open(tmpdir());
  st->insert_job(job("j1", "alice", v1::QUEUED, 1, "req-1"), event("submitted"));
  EXPECT_THROW(st->insert_job(job("j1", "alice", v1::QUEUED, 1), event("submitted")), StoreError);
  // The same request id from the same owner is the same job; another owner's is not.
  EXPECT_THROW(st->insert_job(job("j2", "alice", v1::QUEUED, 2, "req-1"), event("submitted")), StoreError);
  ASSERT_TRUE(st->find_by_request("alice", "req-1"));
  EXPECT_EQ(st->find_by_request("alice", "req-1")->id(), "j1");
  EXPECT_FALSE(st->find_by_request("bob", "req-1"));
  st->insert_job(job("j2", "bob", v1::QUEUED, 2, "req-1"), event("submitted"));

  v1::Job j = *st->get("j1");
  EXPECT_EQ(j.spec().name(), "n-j1");
  j.set_state(v1::RUNNING);
  EXPECT_EQ(st->append_event(j, event("state")), 2);
  j.mutable_progress()->set_step(5);
  EXPECT_EQ(st->append_event(j, event("step")), 3);
  EXPECT_EQ(st->get("j1")->state(), v1::RUNNING);
  EXPECT_EQ(st->get("j1")->progress().step(), 5);
  const auto all = st->events("j1", 0, 0);
  ASSERT_EQ(all.size(), 3u);
  EXPECT_EQ(all[0].kind(), "submitted");
  EXPECT_EQ(all[2].seq(), 3);
  EXPECT_EQ(all[2].job_id(), "j1");
  EXPECT_EQ(st->events("j1", 2, 0).size(), 1u);
  EXPECT_EQ(st->count(v1::RUNNING), 1);
  EXPECT_EQ(st->count(v1::QUEUED, "bob"), 1);
  EXPECT_THROW(st->append_event(job("nope", "x", v1::QUEUED, 0), event("state")), StoreError);
}

TEST(Store, ListsNewestFirstWithFiltersAndPages) {
  auto st = Store::open(tmpdir());
  for (int i = 0; i < 25; ++i) {
    char id[16];
    std::snprintf(id, sizeof id, "j%03d", i);
    st->insert_job(job(id, i % 2 ? "alice" : "bob", i % 3 ? v1::QUEUED : v1::SUCCEEDED, i), event("submitted"));
  }
  std::vector<std::string> seen;
  std::string token;
  do {
    const auto p = st->list({}, "", 10, token);
    for (const auto& j : p.jobs) seen.push_back(j.id());
    token = p.next_page_token;
  } while (!token.empty());
  ASSERT_EQ(seen.size(), 25u);
  EXPECT_EQ(seen.front(), "j024");
  EXPECT_EQ(seen.back(), "j000");
  const auto alice_queued = st->list({v1::QUEUED}, "alice", 100, "");
  for (const auto& j : alice_queued.jobs) {
    EXPECT_EQ(j.owner(), "alice");
    EXPECT_EQ(j.state(), v1::QUEUED);
  }
  EXPECT_EQ(alice_queued.jobs.size(), 8u);  // odd i not divisible by 3: 1,5,7,11,13,17,19,23
  EXPECT_EQ(st->in_states({v1::SUCCEEDED}).size(), 9u);
}

TEST(Store, WorkersAndCalibration) {
  auto st = Store::open(tmpdir());
  st->insert_job(job("j1", "a", v1::RUNNING, 1), event("submitted"));
  st->put_worker({"j1", 4242, "cpu:0", 1 << 20, "/x/worker.out", 0, 1});
  st->set_worker_offset("j1", 99);
  auto w = st->workers();
  ASSERT_EQ(w.size(), 1u);
  EXPECT_EQ(w[0].pid, 4242);
  EXPECT_EQ(w[0].events_offset, 99);
  st->remove_worker("j1");
  EXPECT_TRUE(st->workers().empty());
  for (int i = 0; i < 30; ++i) st->add_calibration({"gpt2|x|cpu", 100, 100 + i, i});
  st->add_calibration({"vit|x|cpu", 10, 11, 100});
  const auto rows = st->calibration(20);
  EXPECT_EQ(rows.size(), 21u);  // the newest 20 of the first key, and the other
  EXPECT_EQ(rows.front().measured_bytes, 110);
}

// What the compute model learned, per kind: replaced by kind, reopened intact, and only the
// most recently written `keep` kinds kept.
TEST(Store, ComputeKindsSurviveReopeningNewestKept) {
  const std::string dir = tmpdir();
  {
    auto st = Store::open(dir);
    st->put_compute_kind({"a|1x1", 3, 4, 1000.5, 800.25, 2.5, 10}, 3);
    st->put_compute_kind({"b|1x1", 1, 0, 5, 0, 0, 11}, 3);
    st->put_compute_kind({"a|1x1", 30, 40, 999.0, 700.0, 3.0, 12}, 3);  // replaces a
    const auto rows = st->compute_kinds();
    ASSERT_EQ(rows.size(), 2u);
    EXPECT_EQ(rows[0].kind, "b|1x1");  // least recently written first
    EXPECT_EQ(rows[1].kind, "a|1x1");
    EXPECT_EQ(rows[1].shared_steps, 40);
  }
  auto st = Store::open(dir);
  auto rows = st->compute_kinds();
  ASSERT_EQ(rows.size(), 2u);
  EXPECT_EQ(rows[1].solo_steps, 30);
  EXPECT_DOUBLE_EQ(rows[1].solo_rate, 999.0);
  EXPECT_DOUBLE_EQ(rows[1].shared_rate, 700.0);
  EXPECT_DOUBLE_EQ(rows[1].shared_jobs, 3.0);
  EXPECT_EQ(rows[1].time_ms, 12);
  st->put_compute_kind({"c|1x1", 1, 1, 1, 1, 1, 13}, 3);
  st->put_compute_kind({"d|1x1", 1, 1, 1, 1, 1, 14}, 3);  // b, the oldest, goes
  rows = st->compute_kinds();
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0].kind, "a|1x1");
  EXPECT_EQ(rows[2].kind, "d|1x1");
  fs::remove_all(dir);
}

TEST(Store, AJobSurvivesItsWriterBeingKilled) {
  const std::string dir = tmpdir();
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    auto st = Store::open(dir);
    st->insert_job(job("survivor", "a", v1::QUEUED, 1), event("submitted"));
    kill(getpid(), SIGKILL);  // no close, no destructor, no checkpoint of the WAL
    _exit(0);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status));
  auto st = Store::open(dir);
  ASSERT_TRUE(st->get("survivor"));
  EXPECT_EQ(st->get("survivor")->state(), v1::QUEUED);
  EXPECT_EQ(st->events("survivor", 0, 0).size(), 1u);
}

}  // namespace
