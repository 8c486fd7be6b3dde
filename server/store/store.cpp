#include "store.h"

#include <sys/stat.h>

#include <sqlite3.h>

#include <algorithm>
#include <filesystem>

namespace memfit::store {
namespace {

namespace fs = std::filesystem;

// A prepared statement that finalizes itself; bind and step with checked results.
class Stmt {
 public:
  Stmt(sqlite3* db, const char* sql) : db_(db) {
    if (sqlite3_prepare_v2(db, sql, -1, &s_, nullptr) != SQLITE_OK) {
      throw StoreError(std::string("store: preparing a statement failed: ") + sqlite3_errmsg(db));
    }
  }
  ~Stmt() { sqlite3_finalize(s_); }
  Stmt(const Stmt&) = delete;
  Stmt& operator=(const Stmt&) = delete;
  Stmt& bind(int i, const std::string& v) {
    check(sqlite3_bind_text(s_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT));
    return *this;
  }
  Stmt& bind(int i, int64_t v) {
    check(sqlite3_bind_int64(s_, i, v));
    return *this;
  }
  Stmt& bind(int i, double v) {
    check(sqlite3_bind_double(s_, i, v));
    return *this;
  }
  Stmt& blob(int i, const std::string& v) {
    check(sqlite3_bind_blob(s_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT));
    return *this;
  }
  // true: a row is ready; false: done.
  bool step() {
    const int rc = sqlite3_step(s_);
    if (rc == SQLITE_ROW) return true;
    if (rc == SQLITE_DONE) return false;
    throw StoreError(std::string("store: ") + sqlite3_errmsg(db_));
  }
  int64_t i64(int c) const { return sqlite3_column_int64(s_, c); }
  double f64(int c) const { return sqlite3_column_double(s_, c); }
  std::string text(int c) const {
    const auto* p = reinterpret_cast<const char*>(sqlite3_column_text(s_, c));
    return p ? std::string(p, static_cast<size_t>(sqlite3_column_bytes(s_, c))) : std::string();
  }
  std::string bytes(int c) const {
    const auto* p = static_cast<const char*>(sqlite3_column_blob(s_, c));
    return p ? std::string(p, static_cast<size_t>(sqlite3_column_bytes(s_, c))) : std::string();
  }

 private:
  void check(int rc) {
    if (rc != SQLITE_OK) throw StoreError(std::string("store: binding failed: ") + sqlite3_errmsg(db_));
  }
  sqlite3* db_;
  sqlite3_stmt* s_ = nullptr;
};

// BEGIN IMMEDIATE ... COMMIT, rolled back if not committed.
class Tx {
 public:
  explicit Tx(sqlite3* db) : db_(db) { run("BEGIN IMMEDIATE"); }
  ~Tx() {
    if (!done_) sqlite3_exec(db_, "ROLLBACK", nullptr, nullptr, nullptr);
  }
  void commit() {
    run("COMMIT");
    done_ = true;
  }

 private:
  void run(const char* sql) {
    char* err = nullptr;
    if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
      std::string msg = err ? err : "unknown";
      sqlite3_free(err);
      throw StoreError(std::string("store: ") + sql + ": " + msg);
    }
  }
  sqlite3* db_;
  bool done_ = false;
};

std::string serialize(const google::protobuf::Message& m) {
  std::string s;
  if (!m.SerializeToString(&s)) throw StoreError("store: serializing a record failed");
  return s;
}

// A record that does not parse becomes a stub from the row's columns, marked with the
// reason: one bad row must not take every read (or the daemon's start) down with it.
v1::Job job_or_stub(const std::string& b, const std::string& id, const std::string& owner, int64_t state) {
  v1::Job j;
  if (j.ParseFromString(b) && j.id() == id) return j;
  j.Clear();
  j.set_id(id);
  j.set_owner(owner);
  j.set_state(v1::JobState_IsValid(static_cast<int>(state)) ? static_cast<v1::JobState>(state) : v1::FAILED);
  j.mutable_failure()->set_kind(v1::SYSTEM);
  j.mutable_failure()->set_reason(kCorruptRecord);
  j.mutable_failure()->set_message("the job's record in memfit.db could not be read");
  return j;
}

int64_t created_ms(const v1::Job& j) {
  return j.created_at().seconds() * 1000 + j.created_at().nanos() / 1000000;
}

std::string state_list(const std::vector<v1::JobState>& states) {
  std::string s;
  for (auto st : states) s += (s.empty() ? "" : ",") + std::to_string(static_cast<int>(st));
  return s;
}

}  // namespace

std::unique_ptr<Store> Store::open(const std::string& state_dir) {
  std::error_code ec;
  fs::create_directories(state_dir, ec);
  if (ec) throw StoreError("state directory " + state_dir + ": " + ec.message());
  const std::string path = (fs::path(state_dir) / "memfit.db").string();
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX, nullptr) !=
      SQLITE_OK) {
    const std::string msg = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    throw StoreError(path + ": " + msg);
  }
  std::unique_ptr<Store> s(new Store(db));
  absl::MutexLock lock(&s->mu_);
  if (sqlite3_db_readonly(db, "main") == 1) throw StoreError(path + ": read-only; memfitd needs to write its state");
  ::chmod(path.c_str(), 0600);  // every user's jobs: not for the workers' user to read
  sqlite3_busy_timeout(db, 5000);
  s->exec("PRAGMA journal_mode=WAL");
  s->exec("PRAGMA synchronous=NORMAL");
  s->exec("PRAGMA foreign_keys=ON");
  s->exec("PRAGMA cache_size=-65536");  // 64 MiB of pages: a busy queue's rows stay in memory
  s->exec(
      "CREATE TABLE IF NOT EXISTS jobs(id TEXT PRIMARY KEY, owner TEXT NOT NULL, request_id TEXT NOT NULL, "
      "state INTEGER NOT NULL, created_ms INTEGER NOT NULL, next_seq INTEGER NOT NULL, job BLOB NOT NULL);"
      "CREATE UNIQUE INDEX IF NOT EXISTS jobs_request ON jobs(owner, request_id) WHERE request_id <> '';"
      "CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, id);"
      "CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, id);"
      "CREATE INDEX IF NOT EXISTS jobs_owner_state ON jobs(owner, state);"
      "CREATE TABLE IF NOT EXISTS events(job_id TEXT NOT NULL REFERENCES jobs(id), seq INTEGER NOT NULL, "
      "event BLOB NOT NULL, PRIMARY KEY(job_id, seq)) WITHOUT ROWID;"
      "CREATE TABLE IF NOT EXISTS workers(job_id TEXT PRIMARY KEY REFERENCES jobs(id), pid INTEGER NOT NULL, "
      "device TEXT NOT NULL, reservation INTEGER NOT NULL, events_path TEXT NOT NULL, events_offset INTEGER NOT NULL, "
      "attempt INTEGER NOT NULL);"
      "CREATE TABLE IF NOT EXISTS calibration(id INTEGER PRIMARY KEY, key TEXT NOT NULL, estimated INTEGER NOT NULL, "
      "measured INTEGER NOT NULL, time_ms INTEGER NOT NULL);"
      "CREATE INDEX IF NOT EXISTS calibration_key ON calibration(key, id);"
      "CREATE TABLE IF NOT EXISTS compute_kinds(kind TEXT PRIMARY KEY, solo_steps INTEGER NOT NULL, "
      "shared_steps INTEGER NOT NULL, solo_rate REAL NOT NULL, shared_rate REAL NOT NULL, shared_jobs REAL NOT NULL, "
      "time_ms INTEGER NOT NULL);");
  // A write must be possible now, not at the first submit.
  s->exec("BEGIN IMMEDIATE; CREATE TABLE IF NOT EXISTS write_check(x); DROP TABLE write_check; COMMIT");
  return s;
}

Store::Store(sqlite3* db) : db_(db) {}

Store::~Store() { sqlite3_close(db_); }

void Store::exec(const char* sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql, nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : "unknown";
    sqlite3_free(err);
    throw StoreError(std::string("store: ") + msg);
  }
}

bool Store::insert_job(const v1::Job& job, const v1::JobEvent& first, int64_t max_queued) {
  absl::MutexLock lock(&mu_);
  Tx tx(db_);
  if (max_queued > 0) {
    Stmt s(db_, "SELECT COUNT(*) FROM jobs WHERE state = ?1 AND owner = ?2");
    s.bind(1, static_cast<int64_t>(v1::QUEUED)).bind(2, job.owner());
    s.step();
    if (s.i64(0) >= max_queued) return false;  // rolled back
  }
  {
    Stmt s(db_, "INSERT INTO jobs(id, owner, request_id, state, created_ms, next_seq, job) VALUES(?,?,?,?,?,2,?)");
    s.bind(1, job.id()).bind(2, job.owner()).bind(3, job.request_id()).bind(4, static_cast<int64_t>(job.state()));
    s.bind(5, created_ms(job)).blob(6, serialize(job));
    s.step();
  }
  v1::JobEvent e = first;
  e.set_job_id(job.id());
  e.set_seq(1);
  {
    Stmt s(db_, "INSERT INTO events(job_id, seq, event) VALUES(?,1,?)");
    s.bind(1, job.id()).blob(2, serialize(e));
    s.step();
  }
  tx.commit();
  return true;
}

std::optional<v1::Job> Store::find_by_request(const std::string& owner, const std::string& request_id) {
  if (request_id.empty()) return std::nullopt;
  absl::MutexLock lock(&mu_);
  Stmt s(db_, "SELECT job, id, owner, state FROM jobs WHERE owner = ? AND request_id = ?");
  s.bind(1, owner).bind(2, request_id);
  if (!s.step()) return std::nullopt;
  return job_or_stub(s.bytes(0), s.text(1), s.text(2), s.i64(3));
}

std::optional<v1::Job> Store::get(const std::string& id) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, "SELECT job, id, owner, state FROM jobs WHERE id = ?");
  s.bind(1, id);
  if (!s.step()) return std::nullopt;
  return job_or_stub(s.bytes(0), s.text(1), s.text(2), s.i64(3));
}

int64_t Store::append_event(const v1::Job& job, v1::JobEvent event) {
  absl::MutexLock lock(&mu_);
  Tx tx(db_);
  int64_t seq = 0;
  {
    Stmt s(db_, "SELECT next_seq FROM jobs WHERE id = ?");
    s.bind(1, job.id());
    if (!s.step()) throw StoreError("store: no job " + job.id());
    seq = s.i64(0);
  }
  event.set_job_id(job.id());
  event.set_seq(seq);
  {
    Stmt s(db_, "INSERT INTO events(job_id, seq, event) VALUES(?,?,?)");
    s.bind(1, job.id()).bind(2, seq).blob(3, serialize(event));
    s.step();
  }
  {
    Stmt s(db_, "UPDATE jobs SET state = ?, next_seq = ?, job = ? WHERE id = ?");
    s.bind(1, static_cast<int64_t>(job.state())).bind(2, seq + 1).blob(3, serialize(job)).bind(4, job.id());
    s.step();
  }
  tx.commit();
  return seq;
}

void Store::update_job(const v1::Job& job) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, "UPDATE jobs SET state = ?, job = ? WHERE id = ?");
  s.bind(1, static_cast<int64_t>(job.state())).blob(2, serialize(job)).bind(3, job.id());
  s.step();
}

Page Store::list(const std::vector<v1::JobState>& states, const std::string& owner, int page_size,
                 const std::string& page_token) {
  page_size = std::clamp(page_size <= 0 ? 100 : page_size, 1, 1000);
  std::string sql = "SELECT id, job, owner, state FROM jobs WHERE 1=1";
  if (!owner.empty()) sql += " AND owner = ?1";
  if (!states.empty()) sql += " AND state IN (" + state_list(states) + ")";
  if (!page_token.empty()) sql += " AND id < ?2";
  sql += " ORDER BY id DESC LIMIT ?3";
  absl::MutexLock lock(&mu_);
  Stmt s(db_, sql.c_str());
  if (!owner.empty()) s.bind(1, owner);
  if (!page_token.empty()) s.bind(2, page_token);
  s.bind(3, static_cast<int64_t>(page_size + 1));
  Page p;
  while (s.step()) {
    if (static_cast<int>(p.jobs.size()) == page_size) {
      p.next_page_token = p.jobs.back().id();
      break;
    }
    p.jobs.push_back(job_or_stub(s.bytes(1), s.text(0), s.text(2), s.i64(3)));
  }
  return p;
}

std::vector<v1::JobEvent> Store::events(const std::string& id, int64_t after_seq, int limit) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, "SELECT event FROM events WHERE job_id = ? AND seq > ? ORDER BY seq LIMIT ?");
  s.bind(1, id).bind(2, after_seq).bind(3, static_cast<int64_t>(limit <= 0 ? 1 << 30 : limit));
  std::vector<v1::JobEvent> out;
  while (s.step()) {
    v1::JobEvent e;
    if (!e.ParseFromString(s.bytes(0))) throw StoreError("store: an event record is corrupt");
    out.push_back(std::move(e));
  }
  return out;
}

std::vector<v1::Job> Store::in_states(const std::vector<v1::JobState>& states) {
  absl::MutexLock lock(&mu_);
  const std::string sql =
      "SELECT job, id, owner, state FROM jobs WHERE state IN (" + state_list(states) + ") ORDER BY id";
  Stmt s(db_, sql.c_str());
  std::vector<v1::Job> out;
  while (s.step()) out.push_back(job_or_stub(s.bytes(0), s.text(1), s.text(2), s.i64(3)));
  return out;
}

int64_t Store::count(v1::JobState state, const std::string& owner) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, owner.empty() ? "SELECT COUNT(*) FROM jobs WHERE state = ?1"
                            : "SELECT COUNT(*) FROM jobs WHERE state = ?1 AND owner = ?2");
  s.bind(1, static_cast<int64_t>(state));
  if (!owner.empty()) s.bind(2, owner);
  s.step();
  return s.i64(0);
}

void Store::put_worker(const WorkerRecord& w) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_,
         "INSERT OR REPLACE INTO workers(job_id, pid, device, reservation, events_path, events_offset, attempt) "
         "VALUES(?,?,?,?,?,?,?)");
  s.bind(1, w.job_id).bind(2, w.pid).bind(3, w.device).bind(4, w.reservation_bytes).bind(5, w.events_path);
  s.bind(6, w.events_offset).bind(7, static_cast<int64_t>(w.attempt));
  s.step();
}

void Store::set_worker_offset(const std::string& job_id, int64_t offset) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, "UPDATE workers SET events_offset = ? WHERE job_id = ?");
  s.bind(1, offset).bind(2, job_id);
  s.step();
}

void Store::remove_worker(const std::string& job_id) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, "DELETE FROM workers WHERE job_id = ?");
  s.bind(1, job_id);
  s.step();
}

std::vector<WorkerRecord> Store::workers() {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, "SELECT job_id, pid, device, reservation, events_path, events_offset, attempt FROM workers ORDER BY job_id");
  std::vector<WorkerRecord> out;
  while (s.step()) {
    out.push_back({s.text(0), s.i64(1), s.text(2), s.i64(3), s.text(4), s.i64(5), static_cast<int32_t>(s.i64(6))});
  }
  return out;
}

void Store::add_calibration(const CalibrationRow& row) {
  absl::MutexLock lock(&mu_);
  Stmt s(db_, "INSERT INTO calibration(key, estimated, measured, time_ms) VALUES(?,?,?,?)");
  s.bind(1, row.key).bind(2, row.estimated_bytes).bind(3, row.measured_bytes).bind(4, row.time_ms);
  s.step();
}

std::vector<CalibrationRow> Store::calibration(int per_key_limit) {
  absl::MutexLock lock(&mu_);
  // The newest per_key_limit rows of each key, oldest first.
  Stmt s(db_,
         "SELECT key, estimated, measured, time_ms FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY key ORDER BY id DESC) "
         "AS n FROM calibration) WHERE n <= ? ORDER BY id");
  s.bind(1, static_cast<int64_t>(per_key_limit));
  std::vector<CalibrationRow> out;
  while (s.step()) out.push_back({s.text(0), s.i64(1), s.i64(2), s.i64(3)});
  return out;
}

void Store::put_compute_kind(const ComputeKindRow& row, int keep) {
  absl::MutexLock lock(&mu_);
  Tx tx(db_);
  Stmt s(db_,
         "INSERT OR REPLACE INTO compute_kinds(kind, solo_steps, shared_steps, solo_rate, shared_rate, shared_jobs, "
         "time_ms) VALUES(?,?,?,?,?,?,?)");
  s.bind(1, row.kind).bind(2, row.solo_steps).bind(3, row.shared_steps).bind(4, row.solo_rate);
  s.bind(5, row.shared_rate).bind(6, row.shared_jobs).bind(7, row.time_ms);
  s.step();
  Stmt d(db_,
         "DELETE FROM compute_kinds WHERE kind NOT IN (SELECT kind FROM compute_kinds ORDER BY time_ms DESC, rowid DESC "
         "LIMIT ?)");
  d.bind(1, static_cast<int64_t>(keep));
  d.step();
  tx.commit();
}

std::vector<ComputeKindRow> Store::compute_kinds() {
  absl::MutexLock lock(&mu_);
  Stmt s(db_,
         "SELECT kind, solo_steps, shared_steps, solo_rate, shared_rate, shared_jobs, time_ms FROM compute_kinds "
         "ORDER BY time_ms, rowid");
  std::vector<ComputeKindRow> out;
  while (s.step()) out.push_back({s.text(0), s.i64(1), s.i64(2), s.f64(3), s.f64(4), s.f64(5), s.i64(6)});
  return out;
}

}  // namespace memfit::store
