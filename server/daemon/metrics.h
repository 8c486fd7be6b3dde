// memfitd's Prometheus endpoint: one collector that builds every family from the core's
// snapshot at scrape time, so per-job series exist exactly while their job runs.
#pragma once

#include <memory>
#include <string>

namespace prometheus {
class Exposer;
}

namespace memfit::daemon {

class Core;
class MetricsCollector;

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
