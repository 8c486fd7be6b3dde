// memfitd's Prometheus endpoint: one collector that builds every family from the core's
// snapshot at scrape time. Per-job series exist while their job runs and, with its final
// state, for metrics.finished_retention_seconds after it ends (metrics_view.h decides).
#pragma once

#include <prometheus/metric_family.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace prometheus {
class Exposer;
}

namespace memfit::daemon {

class Core;
class MetricsCollector;
struct Snapshot;

// The families of successive scrapes: gauges from each snapshot, the histograms summed
// over every snapshot it was given. Tests serialize its output.
class MetricFamilies {
 public:
  MetricFamilies();
  ~MetricFamilies();
  std::vector<prometheus::MetricFamily> build(const Snapshot& s);

 private:
  struct Histograms;
  std::unique_ptr<Histograms> h_;
};

class MetricsExporter {
 public:
  // Serves /metrics on `address` ("127.0.0.1:9540"; port 0 picks one). Throws
  // std::runtime_error when it cannot listen.
  MetricsExporter(const std::string& address, Core& core);
  ~MetricsExporter();
  std::string address() const;  // host:port actually bound

 private:
  std::string host_;
  std::unique_ptr<prometheus::Exposer> exposer_;
  std::shared_ptr<MetricsCollector> collector_;
};

}  // namespace memfit::daemon
