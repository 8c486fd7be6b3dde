// memfitd's placement core: which queued job starts on which device, by reserved bytes.
// Deterministic and free of I/O: time comes in as an argument, ids from the caller; the
// daemon and the scheduling benchmark (bench/schedule_bench.cpp) drive the same code.
//
//   memfit::sched::Scheduler s({{"cuda:0", 80 << 30}, {"cuda:1", 80 << 30}}, {});
//   s.enqueue({"job-1", "alice", /*priority=*/0, /*submitted_ms=*/now, /*reservation=*/12 << 30});
//   for (const auto& p : s.schedule(now)) start(p.job_id, p.device);   // reserved now
//   ...
//   s.release("job-1");                       // once its worker process is gone
//
// Policy (each piece is small and tested on its own, tests/scheduler/):
// - a device holds several jobs while their reservations fit in its total;
// - order: higher priority first, FIFO inside a priority (then id, for determinism);
// - placement (Options::placement):
//   - spread (the default): among the devices where the job fits, the one with the least
//     compute already committed (an idle device first; ties: best fit), so that jobs do not
//     share a GPU's compute while another GPU idles. It packs onto a busier device only when
//     spreading would take the room a waiting job needs: when placing the job there would
//     leave no device with as much free memory as the largest other queued job reserves
//     (or, when that job fits nowhere yet, would shrink the most free memory left on any
//     device); then it falls back to best fit;
//   - best fit: the device left with the least free memory that still fits (memfit's
//     placement before compute was counted; the benchmark compares both);
//   a job's compute is the fraction of a device's compute it uses alone, (0, 1]: the
//   daemon learns it per kind of job from the throughput workers report (ComputeModel),
//   1 (a whole device) until it knows better;
// - backfill: a job that does not fit now does not block smaller ones behind it, until it
//   has waited `starvation_ms`; then the device that can hold it and has the most free
//   memory is drained for it (nothing else starts there until it has started);
// - a job that no device can hold even alone is refused at admission (fits_alone).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <vector>

namespace memfit::sched {

struct Device {
  std::string name;  // "cuda:0", "cpu:1", "slurm:gpu-shared"
  int64_t total_bytes = 0;
  // The most one job may reserve on it (0: total_bytes). A Slurm partition is one device
  // of all its GPUs' memory, but a job gets shards of one GPU.
  int64_t max_job_bytes = 0;
};

struct QueuedJob {
  std::string id;
  std::string owner;
  int priority = 0;           // higher first
  int64_t submitted_ms = 0;   // FIFO inside a priority; aging
  int64_t reservation_bytes = 0;
  double compute = 1.0;       // fraction of a device's compute it uses alone, (0, 1]
};

struct Placement {
  std::string job_id;
  std::string device;
  int64_t reservation_bytes = 0;
};

enum class PlacementPolicy { kSpread, kBestFit };

struct Options {
  int64_t starvation_ms = int64_t{30} * 60 * 1000;  // then drain a device for the blocked job
  PlacementPolicy placement = PlacementPolicy::kSpread;
};

class Scheduler {
 public:
  Scheduler(std::vector<Device> devices, Options options);

  // Whether some device could hold `bytes` with nothing else on it.
  bool fits_alone(int64_t bytes) const;
  // The most one job may reserve anywhere (a device's max_job_bytes, else its total).
  int64_t largest_device_bytes() const;

  // Throws std::invalid_argument for a duplicate id, a non-positive reservation or one no
  // device can hold.
  void enqueue(const QueuedJob& job);
  // A queued job leaves the queue (cancelled before it started). False if not queued.
  bool remove_queued(const std::string& id);
  // Jobs to start now, in order; their reservations are taken.
  std::vector<Placement> schedule(int64_t now_ms);
  // The job's process is gone: its reservation is free again. False if it held none.
  bool release(const std::string& id);
  // Recovery: a job already running on `device` keeps its reservation.
  void adopt(const std::string& id, const std::string& device, int64_t reservation_bytes, double compute = 1.0);
  // A running job's compute, learned while it runs (the device's committed compute follows).
  // False if it is not running.
  bool set_compute(const std::string& id, double compute);

  // Views (metrics, ListDevices).
  const std::vector<Device>& devices() const { return devices_; }
  int64_t reserved_bytes(const std::string& device) const;
  // The sum of the compute of the jobs running on `device` (0: idle; above 1: they share it).
  double committed_compute(const std::string& device) const;
  std::vector<std::string> jobs_on(const std::string& device) const;
  size_t queue_length() const { return queue_.size(); }
  bool is_queued(const std::string& id) const { return queued_.count(id) > 0; }
  std::optional<std::string> device_of(const std::string& id) const;
  // The device being drained for a starving job, and that job.
  std::optional<std::pair<std::string, std::string>> draining() const;

 private:
  struct Key {
    int priority;
    int64_t submitted_ms;
    std::string id;
    bool operator<(const Key& o) const;
  };
  struct Running {
    size_t device;
    int64_t reservation;
    double compute;
  };
  size_t index_of(const std::string& device) const;
  int64_t free_on(size_t d) const { return devices_[d].total_bytes - reserved_[d]; }
  // Where queued job `j` goes now (nullopt: nowhere yet), by options_.placement.
  std::optional<size_t> choose(const QueuedJob& j) const;

  std::vector<Device> devices_;
  Options options_;
  std::vector<int64_t> reserved_;
  std::vector<double> compute_;
  std::map<Key, QueuedJob> queue_;
  std::map<std::string, Key> queued_;
  std::multiset<int64_t> queued_sizes_;
  std::map<std::string, Running> running_;
  std::optional<std::pair<size_t, std::string>> drain_;  // device, job
};

// Reservations: the calibrated estimate plus a safety margin; after an out-of-memory,
// a larger one, a bounded number of times.
struct ReservationPolicy {
  double margin = 0.08;      // over the calibrated estimate (docs/PERFORMANCE.md: scheduling)
  double oom_growth = 1.25;  // each retry after an out-of-memory
  int max_oom_retries = 2;

  int64_t reserve(int64_t calibrated_estimate_bytes) const;
  // The reservation for attempt `attempt` + 1 after an out-of-memory at `reservation`; 0
  // when the retries are spent or no device could hold it.
  int64_t after_oom(int64_t reservation_bytes, int attempt, int64_t largest_device_bytes) const;
};

}  // namespace memfit::sched
