#include "metrics.h"

#include <prometheus/collectable.h>
#include <prometheus/exposer.h>
#include <prometheus/metric_family.h>

#include <algorithm>
#include <array>
#include <mutex>
#include <stdexcept>

#include "core.h"

namespace memfit::daemon {
namespace {

using prometheus::ClientMetric;
using prometheus::MetricFamily;
using prometheus::MetricType;

MetricFamily family(const char* name, const char* help, MetricType t) {
  MetricFamily f;
  f.name = name;
  f.help = help;
  f.type = t;
  return f;
}

ClientMetric gauge(double v, std::vector<ClientMetric::Label> labels) {
  ClientMetric m;
  m.label = std::move(labels);
  m.gauge.value = v;
  return m;
}

// A cumulative histogram kept across scrapes (the snapshot hands over new samples only).
struct Histogram {
  std::vector<double> bounds;
  std::vector<uint64_t> counts;  // per bucket, not cumulative; last = +Inf
  uint64_t n = 0;
  double sum = 0;
  explicit Histogram(std::vector<double> b) : bounds(std::move(b)), counts(bounds.size() + 1, 0) {}
  void add(double v) {
    const size_t i = static_cast<size_t>(std::lower_bound(bounds.begin(), bounds.end(), v) - bounds.begin());
    ++counts[i];
    ++n;
    sum += v;
  }
  ClientMetric metric() const {
    ClientMetric m;
    m.histogram.sample_count = n;
    m.histogram.sample_sum = sum;
    uint64_t c = 0;
    for (size_t i = 0; i < bounds.size(); ++i) {
      c += counts[i];
      m.histogram.bucket.push_back({c, bounds[i]});
    }
    m.histogram.bucket.push_back({n, std::numeric_limits<double>::infinity()});
    return m;
  }
};

}  // namespace

struct MetricFamilies::Histograms {
  Histogram ratios{{0.5, 0.8, 0.9, 0.95, 0.98, 1.0, 1.02, 1.05, 1.1, 1.2, 1.5, 2.0}};
  Histogram placement{{0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600.0, 24 * 3600.0}};
};

MetricFamilies::MetricFamilies() : h_(std::make_unique<Histograms>()) {}
MetricFamilies::~MetricFamilies() = default;

std::vector<MetricFamily> MetricFamilies::build(const Snapshot& s) {
  for (double r : s.estimate_ratios) h_->ratios.add(r);
  for (double p : s.placement_seconds) h_->placement.add(p);

  std::vector<MetricFamily> out;
  auto dev_total = family("memfit_device_memory_total_bytes", "Memory of the device that memfitd schedules on.",
                          MetricType::Gauge);
  auto dev_reserved = family("memfit_device_memory_reserved_bytes",
                             "Memory reserved on the device by the jobs placed on it.", MetricType::Gauge);
  auto dev_used = family("memfit_device_memory_used_bytes",
                         "Memory measured in use on the device (NVML for GPUs; the workers' meters for CPU devices).",
                         MetricType::Gauge);
  auto dev_peak = family("memfit_device_memory_peak_bytes",
                         "Highest memory in use on the device since the previous scrape (NVML sampled at every "
                         "scheduling tick for GPUs; for CPU devices the sum of the running jobs' reported peaks).",
                         MetricType::Gauge);
  auto dev_compute = family("memfit_device_committed_compute",
                            "Sum of the compute shares of the jobs running on the device (learned from their "
                            "throughput alone and shared; until then a bound from a learned kind like it, else 1 per job): 0 idle, "
                            "above 1 they slow each other down.",
                            MetricType::Gauge);
  for (const auto& d : s.devices) {
    const std::vector<ClientMetric::Label> l{{"device", LabelValue(d.name)}, {"kind", LabelValue(d.kind)}};
    dev_compute.metric.push_back(gauge(d.committed_compute, l));
    dev_total.metric.push_back(gauge(static_cast<double>(d.total), l));
    dev_reserved.metric.push_back(gauge(static_cast<double>(d.reserved), l));
    dev_used.metric.push_back(gauge(static_cast<double>(std::max<int64_t>(0, d.used)), l));
    dev_peak.metric.push_back(gauge(static_cast<double>(std::max<int64_t>(0, d.peak)), l));
  }
  for (auto* f : {&dev_total, &dev_reserved, &dev_used, &dev_peak, &dev_compute}) out.push_back(std::move(*f));
  auto slow = family("memfit_colocation_slowdown",
                     "How much slower a kind of job runs beside other jobs on its device than alone (solo / shared "
                     "throughput); absent until both were seen.",
                     MetricType::Gauge);
  auto share = family("memfit_job_kind_compute_share",
                      "The fraction of a device's compute a kind of job uses alone, as placement assumes it (until "
                      "learned: a bound from a learned kind like it, else 1).",
                      MetricType::Gauge);
  for (const auto& k : s.kinds) {
    const std::vector<ClientMetric::Label> l{{"job_kind", LabelValue(k.kind)}};
    if (k.slowdown > 0) slow.metric.push_back(gauge(k.slowdown, l));
    share.metric.push_back(gauge(k.compute, l));
  }
  out.push_back(std::move(slow));
  out.push_back(std::move(share));

  auto info = family("memfit_job_info",
                     "A job memfitd exports series for (running, or finished within "
                     "metrics.finished_retention_seconds); always 1.",
                     MetricType::Gauge);
  auto est = family("memfit_job_estimated_peak_bytes", "The estimator's peak memory for the job (before calibration).",
                    MetricType::Gauge);
  auto res = family("memfit_job_reserved_bytes", "Memory reserved for the job.", MetricType::Gauge);
  auto peak = family("memfit_job_measured_peak_bytes", "Peak memory the job's worker has measured so far.",
                     MetricType::Gauge);
  auto act = family("memfit_job_activation_bytes", "Activation bytes the job keeps for backward.", MetricType::Gauge);
  auto saved = family("memfit_job_activation_saved_bytes",
                      "Activation bytes memfit's ops save for the job against the stock ops (estimated).",
                      MetricType::Gauge);
  auto steps = family("memfit_job_steps", "Optimizer steps the job has done.", MetricType::Gauge);
  auto total = family("memfit_job_steps_total_planned", "Optimizer steps the job will do.", MetricType::Gauge);
  auto loss = family("memfit_job_loss", "The job's last training loss.", MetricType::Gauge);
  for (const auto& j : s.jobs) {
    info.metric.push_back(gauge(1, {{"job_id", j.id},
                                    {"name", j.name},
                                    {"owner", j.owner},
                                    {"model", j.model},
                                    {"method", j.method},
                                    {"preset", j.preset}}));
    const std::vector<ClientMetric::Label> l{
        {"job_id", j.id}, {"owner", j.owner}, {"device", j.device}, {"state", j.state}};
    est.metric.push_back(gauge(static_cast<double>(j.estimated), l));
    res.metric.push_back(gauge(static_cast<double>(j.reserved), l));
    peak.metric.push_back(gauge(static_cast<double>(j.measured_peak), l));
    act.metric.push_back(gauge(static_cast<double>(j.activation_bytes), l));
    saved.metric.push_back(gauge(static_cast<double>(j.activation_saved), l));
    steps.metric.push_back(gauge(static_cast<double>(j.step), l));
    total.metric.push_back(gauge(static_cast<double>(j.total_steps), l));
    loss.metric.push_back(gauge(j.loss, l));
  }
  for (auto* f : {&info, &est, &res, &peak, &act, &saved, &steps, &total, &loss}) out.push_back(std::move(*f));

  auto states = family("memfit_jobs", "Jobs in the store by state.", MetricType::Gauge);
  for (const auto& [st, n] : s.jobs_by_state) {
    states.metric.push_back(gauge(static_cast<double>(n), {{"state", StateLabel(static_cast<v1::JobState>(st))}}));
  }
  out.push_back(std::move(states));
  auto queue = family("memfit_queue_length", "Jobs waiting for a placement.", MetricType::Gauge);
  queue.metric.push_back(gauge(static_cast<double>(s.queue_length), {}));
  out.push_back(std::move(queue));
  auto ooms = family("memfit_oom_retries_total",
                     "Jobs put back in the queue with a larger reservation after running out of memory.",
                     MetricType::Counter);
  ClientMetric c;
  c.counter.value = static_cast<double>(s.oom_retries_total);
  ooms.metric.push_back(c);
  out.push_back(std::move(ooms));

  auto ratio = family("memfit_estimate_error_ratio", "Measured peak / estimated peak of finished jobs.",
                      MetricType::Histogram);
  ratio.metric.push_back(h_->ratios.metric());
  out.push_back(std::move(ratio));
  auto place = family("memfit_placement_latency_seconds", "Time from submission (or requeue) to placement on a device.",
                      MetricType::Histogram);
  place.metric.push_back(h_->placement.metric());
  out.push_back(std::move(place));
  return out;
}

class MetricsCollector : public prometheus::Collectable {
 public:
  explicit MetricsCollector(Core& core) : core_(core) {}

  std::vector<MetricFamily> Collect() const override {
    // One scrape at a time: the snapshot ends the devices' peak window and hands over
    // new histogram samples, so two concurrent scrapes must not interleave.
    std::lock_guard<std::mutex> lock(mu_);
    return families_.build(core_.snapshot());
  }

 private:
  Core& core_;
  mutable std::mutex mu_;
  mutable MetricFamilies families_;
};

MetricsExporter::MetricsExporter(const std::string& address, Core& core) {
  const auto colon = address.rfind(':');
  if (colon == std::string::npos) throw std::runtime_error("metrics_listen: expected HOST:PORT, got '" + address + "'");
  host_ = address.substr(0, colon);
  try {
    exposer_ = std::make_unique<prometheus::Exposer>(address, 2);
  } catch (const std::exception& e) {
    throw std::runtime_error("cannot listen on " + address + ": " + e.what());
  }
  collector_ = std::make_shared<MetricsCollector>(core);
  exposer_->RegisterCollectable(collector_, "/metrics");
}

MetricsExporter::~MetricsExporter() {
  if (exposer_) exposer_->RemoveCollectable(collector_, "/metrics");
}

std::string MetricsExporter::address() const {
  const auto ports = exposer_->GetListeningPorts();
  return host_ + ":" + (ports.empty() ? std::string("?") : std::to_string(ports.front()));
}

}  // namespace memfit::daemon
