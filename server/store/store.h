// memfitd's durable state: jobs, their events, the running workers and the estimator's
// calibration observations, in one SQLite database (WAL) under the state directory.
//
//   auto st = memfit::store::Store::open("/var/lib/memfit");   // creates memfit.db
//   st->insert_job(job, submitted_event);                      // one transaction
//   st->append_event(job_after, event);                        // job row + event, atomically
//
// Every write is one transaction: a job accepted by SubmitJob is in the database before
// the call returns, and a daemon killed with SIGKILL finds it again (WAL, synchronous =
// NORMAL: durable across process crashes; an OS crash may lose the last transactions).
// Thread-safe: one connection behind a mutex.
#pragma once

#include <cstdint>
#include <memory>
#include <absl/base/thread_annotations.h>
#include <absl/synchronization/mutex.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "memfit/v1/service.pb.h"

struct sqlite3;

namespace memfit::store {

class StoreError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A worker process the daemon started, for adoption after a restart.
struct WorkerRecord {
  std::string job_id;
  int64_t pid = 0;
  std::string device;
  int64_t reservation_bytes = 0;
  std::string events_path;  // the worker's stdout (JSON lines)
  int64_t events_offset = 0;  // bytes of it already turned into job events
  int32_t attempt = 0;
};

// The failure reason of a job whose record could not be read: reads return a stub (id,
// owner, state from the row) with this reason instead of failing.
inline constexpr const char* kCorruptRecord = "corrupt_record";

struct CalibrationRow {
  std::string key;
  int64_t estimated_bytes = 0, measured_bytes = 0, time_ms = 0;
};

// What memfitd learned of one kind of job's throughput (sched::ComputeModel::Stats),
// kept across restarts.
struct ComputeKindRow {
  std::string kind;
  int64_t solo_steps = 0, shared_steps = 0;
  double solo_rate = 0, shared_rate = 0, shared_jobs = 0;
  int64_t time_ms = 0;  // when it was written
};

struct Page {
  std::vector<v1::Job> jobs;
  std::string next_page_token;
};

class Store {
 public:
  // Throws StoreError naming the file when it cannot be opened or written (read-only).
  static std::unique_ptr<Store> open(const std::string& state_dir);
  ~Store();
  Store(const Store&) = delete;
  Store& operator=(const Store&) = delete;

  // A new job with its first event (seq 1). Throws StoreError if the id exists. With
  // max_queued > 0, inserts only if the owner has fewer QUEUED jobs (checked in the same
  // transaction) and returns false otherwise.
  bool insert_job(const v1::Job& job, const v1::JobEvent& first, int64_t max_queued = 0);
  // The job submitted earlier by `owner` with this request id, if any.
  std::optional<v1::Job> find_by_request(const std::string& owner, const std::string& request_id);
  std::optional<v1::Job> get(const std::string& id);
  // Replaces the job row and appends the event with the job's next seq (returned).
  int64_t append_event(const v1::Job& job, v1::JobEvent event);
  // Replaces the job row only (progress that is not worth an event).
  void update_job(const v1::Job& job);
  // Newest first. owner "" = every owner; states empty = every state. The token is the
  // last id of the previous page.
  Page list(const std::vector<v1::JobState>& states, const std::string& owner, int page_size,
            const std::string& page_token);
  std::vector<v1::JobEvent> events(const std::string& id, int64_t after_seq, int limit);
  std::vector<v1::Job> in_states(const std::vector<v1::JobState>& states);
  int64_t count(v1::JobState state, const std::string& owner = "");

  void put_worker(const WorkerRecord& w);
  void set_worker_offset(const std::string& job_id, int64_t offset);
  void remove_worker(const std::string& job_id);
  std::vector<WorkerRecord> workers();

  void add_calibration(const CalibrationRow& row);
  std::vector<CalibrationRow> calibration(int per_key_limit);

  // Replaces the kind's row, then keeps only the `keep` most recently written kinds.
  void put_compute_kind(const ComputeKindRow& row, int keep);
  // Every kind kept, least recently written first.
  std::vector<ComputeKindRow> compute_kinds();

 private:
  explicit Store(sqlite3* db);
  void exec(const char* sql) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Mutex mu_;
  sqlite3* const db_ ABSL_GUARDED_BY(mu_);  // one connection: every statement under mu_
};

}  // namespace memfit::store
