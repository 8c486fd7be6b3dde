#include "scheduler.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace memfit::sched {

bool Scheduler::Key::operator<(const Key& o) const {
  if (priority != o.priority) return priority > o.priority;
  if (submitted_ms != o.submitted_ms) return submitted_ms < o.submitted_ms;
  return id < o.id;
}

Scheduler::Scheduler(std::vector<Device> devices, Options options)
    : devices_(std::move(devices)), options_(options), reserved_(devices_.size(), 0), compute_(devices_.size(), 0.0) {
  for (const Device& d : devices_) {
    if (d.total_bytes <= 0) throw std::invalid_argument("device " + d.name + ": total memory must be positive");
  }
}

int64_t Scheduler::largest_device_bytes() const {
  int64_t m = 0;
  for (const Device& d : devices_) m = std::max(m, d.max_job_bytes > 0 ? std::min(d.max_job_bytes, d.total_bytes) : d.total_bytes);
  return m;
}

bool Scheduler::fits_alone(int64_t bytes) const { return bytes > 0 && bytes <= largest_device_bytes(); }

size_t Scheduler::index_of(const std::string& device) const {
  for (size_t i = 0; i < devices_.size(); ++i) {
    if (devices_[i].name == device) return i;
  }
  throw std::invalid_argument("no device named " + device);
}

void Scheduler::enqueue(const QueuedJob& job) {
  if (job.id.empty()) throw std::invalid_argument("job without an id");
  if (queued_.count(job.id) || running_.count(job.id)) throw std::invalid_argument("job " + job.id + " is already known");
  if (!(job.compute > 0.0 && job.compute <= 1.0)) {
    throw std::invalid_argument("job " + job.id + ": compute " + std::to_string(job.compute) + " is not in (0, 1]");
  }
  if (!fits_alone(job.reservation_bytes)) {
    throw std::invalid_argument("job " + job.id + ": a reservation of " + std::to_string(job.reservation_bytes) +
                                " bytes fits no device (the largest has " + std::to_string(largest_device_bytes()) + ")");
  }
  const Key k{job.priority, job.submitted_ms, job.id};
  queue_.emplace(k, job);
  queued_.emplace(job.id, k);
  queued_sizes_.insert(job.reservation_bytes);
}

bool Scheduler::remove_queued(const std::string& id) {
  const auto it = queued_.find(id);
  if (it == queued_.end()) return false;
  const auto q = queue_.find(it->second);
  queued_sizes_.erase(queued_sizes_.find(q->second.reservation_bytes));
  queue_.erase(q);
  queued_.erase(it);
  if (drain_ && drain_->second == id) drain_.reset();
  return true;
}

std::vector<Placement> Scheduler::schedule(int64_t now_ms) {
  std::vector<Placement> out;
  if (drain_ && !queued_.count(drain_->second)) drain_.reset();
  for (auto it = queue_.begin(); it != queue_.end();) {
    // Nothing left can fit anywhere: stop scanning (a long queue costs nothing then).
    int64_t most_free = 0;
    for (size_t d = 0; d < devices_.size(); ++d) most_free = std::max(most_free, free_on(d));
    if (queued_sizes_.empty() || most_free < *queued_sizes_.begin()) break;

    const QueuedJob& j = it->second;
    const std::optional<size_t> best = choose(j);
    if (best) {
      reserved_[*best] += j.reservation_bytes;
      compute_[*best] += j.compute;
      running_[j.id] = Running{*best, j.reservation_bytes, j.compute};
      out.push_back({j.id, devices_[*best].name, j.reservation_bytes});
      if (drain_ && drain_->second == j.id) drain_.reset();
      queued_sizes_.erase(queued_sizes_.find(j.reservation_bytes));
      queued_.erase(j.id);
      it = queue_.erase(it);
      continue;
    }
    if (!drain_ && now_ms - j.submitted_ms >= options_.starvation_ms) {
      // Drain the device that can hold it and will need the fewest departures: the most
      // free memory now.
      std::optional<size_t> target;
      for (size_t d = 0; d < devices_.size(); ++d) {
        if (devices_[d].total_bytes < j.reservation_bytes) continue;
        if (!target || free_on(d) > free_on(*target)) target = d;
      }
      if (target) drain_ = std::make_pair(*target, j.id);
    }
    ++it;
  }
  return out;
}

std::optional<size_t> Scheduler::choose(const QueuedJob& j) const {
  const size_t n = devices_.size();
  auto allowed = [&](size_t d) {
    if (drain_ && drain_->first == d && drain_->second != j.id) return false;  // kept for the starving job
    if (devices_[d].max_job_bytes > 0 && j.reservation_bytes > devices_[d].max_job_bytes) return false;
    return free_on(d) >= j.reservation_bytes;
  };
  // Best fit: the least free memory left.
  std::optional<size_t> tightest;
  for (size_t d = 0; d < n; ++d) {
    if (!allowed(d)) continue;
    if (!tightest || free_on(d) < free_on(*tightest)) tightest = d;
  }
  if (!tightest || options_.placement == PlacementPolicy::kBestFit) return tightest;

  // The room the other queued jobs need: as much free memory somewhere as the largest of
  // them reserves, or, when that fits nowhere yet, all that the emptiest device has.
  int64_t largest_other = 0;
  bool skipped_self = false;
  for (auto r = queued_sizes_.rbegin(); r != queued_sizes_.rend(); ++r) {
    if (!skipped_self && *r == j.reservation_bytes && queued_.count(j.id)) {
      skipped_self = true;  // j itself
      continue;
    }
    largest_other = *r;
    break;
  }
  int64_t most_free = 0;
  for (size_t d = 0; d < n; ++d) most_free = std::max(most_free, free_on(d));
  const int64_t need = std::min(largest_other, most_free);
  auto room_after = [&](size_t on) {
    int64_t m = 0;
    for (size_t d = 0; d < n; ++d) m = std::max(m, free_on(d) - (d == on ? j.reservation_bytes : 0));
    return m;
  };

  // Spread: among the devices that leave that room, the one where the job adds the least
  // compute sharing: how far the device's committed compute goes past one device's worth
  // with it, less how far it went past without it. A device where the job and its
  // neighbours together stay within one device's compute is as good as an idle one (no one
  // slows down); with unknown compute (1) that is an idle device. Ties (within a
  // hundredth of a device): the least committed compute, then best fit. None leaves the
  // room: pack (best fit).
  auto added_sharing = [&](size_t d) {
    return std::max(0.0, compute_[d] + j.compute - 1.0) - std::max(0.0, compute_[d] - 1.0);
  };
  // Whether device a is a better place than b (a hundredth of a device is a tie).
  auto better = [&](size_t a, size_t b) {
    const double sa = added_sharing(a), sb = added_sharing(b);
    if (sa < sb - 0.01) return true;
    if (sa > sb + 0.01) return false;
    if (compute_[a] < compute_[b] - 0.01) return true;
    if (compute_[a] > compute_[b] + 0.01) return false;
    return free_on(a) < free_on(b);
  };
  std::optional<size_t> best;
  for (size_t d = 0; d < n; ++d) {
    if (!allowed(d) || room_after(d) < need) continue;
    if (!best || better(d, *best)) best = d;
  }
  return best ? best : tightest;
}

bool Scheduler::set_compute(const std::string& id, double compute) {
  const auto it = running_.find(id);
  if (it == running_.end() || !(compute > 0.0 && compute <= 1.0)) return false;
  compute_[it->second.device] += compute - it->second.compute;
  it->second.compute = compute;
  return true;
}

double Scheduler::committed_compute(const std::string& device) const {
  const double c = compute_[index_of(device)];
  return c < 1e-9 ? 0.0 : c;  // sums of doubles: an idle device reads 0
}

bool Scheduler::release(const std::string& id) {
  const auto it = running_.find(id);
  if (it == running_.end()) return false;
  reserved_[it->second.device] -= it->second.reservation;
  compute_[it->second.device] -= it->second.compute;
  running_.erase(it);
  return true;
}

void Scheduler::adopt(const std::string& id, const std::string& device, int64_t reservation_bytes, double compute) {
  if (queued_.count(id) || running_.count(id)) throw std::invalid_argument("job " + id + " is already known");
  if (!(compute > 0.0 && compute <= 1.0)) compute = 1.0;
  const size_t d = index_of(device);
  reserved_[d] += reservation_bytes;
  compute_[d] += compute;
  running_[id] = Running{d, reservation_bytes, compute};
}

int64_t Scheduler::reserved_bytes(const std::string& device) const { return reserved_[index_of(device)]; }

std::vector<std::string> Scheduler::jobs_on(const std::string& device) const {
  const size_t d = index_of(device);
  std::vector<std::string> out;
  for (const auto& [id, r] : running_) {
    if (r.device == d) out.push_back(id);
  }
  return out;
}

std::optional<std::string> Scheduler::device_of(const std::string& id) const {
  const auto it = running_.find(id);
  if (it == running_.end()) return std::nullopt;
  return devices_[it->second.device].name;
}

std::optional<std::pair<std::string, std::string>> Scheduler::draining() const {
  if (!drain_) return std::nullopt;
  return std::make_pair(devices_[drain_->first].name, drain_->second);
}

int64_t ReservationPolicy::reserve(int64_t calibrated_estimate_bytes) const {
  const double v = std::ceil(static_cast<double>(calibrated_estimate_bytes) * (1.0 + margin));
  return v >= 9.0e18 ? std::numeric_limits<int64_t>::max() : static_cast<int64_t>(v);
}

int64_t ReservationPolicy::after_oom(int64_t reservation_bytes, int attempt, int64_t largest_device_bytes) const {
  if (attempt > max_oom_retries) return 0;
  const double v = std::ceil(static_cast<double>(reservation_bytes) * oom_growth);
  if (v > static_cast<double>(largest_device_bytes)) {
    // One last try with a whole device, unless it already had one.
    return reservation_bytes < largest_device_bytes ? largest_device_bytes : 0;
  }
  return static_cast<int64_t>(v);
}

}  // namespace memfit::sched
