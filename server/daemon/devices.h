// The devices memfitd schedules on: NVIDIA GPUs found through NVML (libnvidia-ml.so.1,
// opened with dlopen at run time: no link-time dependency, nothing needed where there is
// no driver), else the configured CPU devices.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "config.h"

namespace memfit::daemon {

struct DeviceInfo {
  std::string name;   // "cuda:0", "cpu:1"
  std::string kind;   // "cuda" | "cpu"
  std::string model;  // NVML's name, or "configured"
  int64_t total_bytes = 0;
  int index = 0;      // CUDA ordinal, or CPU device number
  int64_t max_job_bytes = 0;  // the most one job may reserve (0: total_bytes): a Slurm partition's GPU
};

class DeviceMonitor {
 public:
  virtual ~DeviceMonitor() = default;
  // NVML when cfg.gpus and a driver is present and no explicit devices are configured;
  // otherwise the configured or default CPU devices. `log` gets what was found.
  static std::unique_ptr<DeviceMonitor> create(const Config& cfg, std::string* log);
  virtual const std::vector<DeviceInfo>& devices() const = 0;
  // Memory in use on the device as the driver sees it; -1 when unknown (CPU devices: the
  // daemon sums its workers' own meters instead).
  virtual int64_t used_bytes(const std::string& name) = 0;
};

}  // namespace memfit::daemon
