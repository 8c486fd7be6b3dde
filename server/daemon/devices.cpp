#include "devices.h"

#include <dlfcn.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>

#include "estimator.h"

namespace memfit::daemon {
namespace {

// The few NVML entry points memfitd needs (nvml.h is not required to build).
using nvmlReturn_t = int;
using nvmlDevice_t = void*;
struct nvmlMemory_t {
  unsigned long long total, free, used;
};

class Nvml final : public DeviceMonitor {
 public:
  static std::unique_ptr<Nvml> open(std::string* log) {
    void* lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == nullptr) {
      *log += "NVML: not found (" + std::string(dlerror()) + ")\n";
      return nullptr;
    }
    std::unique_ptr<Nvml> n(new Nvml(lib));
    auto sym = [&](const char* s) { return dlsym(lib, s); };
    n->init_ = reinterpret_cast<nvmlReturn_t (*)()>(sym("nvmlInit_v2"));
    n->shutdown_ = reinterpret_cast<nvmlReturn_t (*)()>(sym("nvmlShutdown"));
    n->count_ = reinterpret_cast<nvmlReturn_t (*)(unsigned*)>(sym("nvmlDeviceGetCount_v2"));
    n->handle_ = reinterpret_cast<nvmlReturn_t (*)(unsigned, nvmlDevice_t*)>(sym("nvmlDeviceGetHandleByIndex_v2"));
    n->name_ = reinterpret_cast<nvmlReturn_t (*)(nvmlDevice_t, char*, unsigned)>(sym("nvmlDeviceGetName"));
    n->memory_ = reinterpret_cast<nvmlReturn_t (*)(nvmlDevice_t, nvmlMemory_t*)>(sym("nvmlDeviceGetMemoryInfo"));
    if (!n->init_ || !n->shutdown_ || !n->count_ || !n->handle_ || !n->name_ || !n->memory_) {
      *log += "NVML: libnvidia-ml.so.1 lacks an entry point memfitd needs\n";
      return nullptr;
    }
    if (n->init_() != 0) {
      *log += "NVML: nvmlInit failed (no driver loaded?)\n";
      return nullptr;
    }
    n->initialized_ = true;
    unsigned count = 0;
    if (n->count_(&count) != 0 || count == 0) {
      *log += "NVML: no GPU\n";
      return nullptr;
    }
    for (unsigned i = 0; i < count; ++i) {
      nvmlDevice_t h = nullptr;
      nvmlMemory_t m{};
      char name[96] = {0};
      if (n->handle_(i, &h) != 0 || n->memory_(h, &m) != 0) continue;
      n->name_(h, name, sizeof name);
      n->handles_.push_back(h);
      n->devices_.push_back({"cuda:" + std::to_string(i), "cuda", name, static_cast<int64_t>(m.total), static_cast<int>(i)});
      *log += "GPU cuda:" + std::to_string(i) + ": " + name + ", " + estimator::format_size(static_cast<int64_t>(m.total)) +
              "\n";
    }
    if (n->devices_.empty()) return nullptr;
    return n;
  }
  ~Nvml() override {
    if (initialized_) shutdown_();
    dlclose(lib_);
  }
  const std::vector<DeviceInfo>& devices() const override { return devices_; }
  int64_t used_bytes(const std::string& name) override {
    for (size_t i = 0; i < devices_.size(); ++i) {
      if (devices_[i].name != name) continue;
      nvmlMemory_t m{};
      if (memory_(handles_[i], &m) != 0) return -1;
      return static_cast<int64_t>(m.used);
    }
    return -1;
  }

 private:
  explicit Nvml(void* lib) : lib_(lib) {}
  void* lib_;
  bool initialized_ = false;
  nvmlReturn_t (*init_)() = nullptr;
  nvmlReturn_t (*shutdown_)() = nullptr;
  nvmlReturn_t (*count_)(unsigned*) = nullptr;
  nvmlReturn_t (*handle_)(unsigned, nvmlDevice_t*) = nullptr;
  nvmlReturn_t (*name_)(nvmlDevice_t, char*, unsigned) = nullptr;
  nvmlReturn_t (*memory_)(nvmlDevice_t, nvmlMemory_t*) = nullptr;
  std::vector<nvmlDevice_t> handles_;
  std::vector<DeviceInfo> devices_;
};

class Configured final : public DeviceMonitor {
 public:
  explicit Configured(std::vector<DeviceInfo> d) : devices_(std::move(d)) {}
  const std::vector<DeviceInfo>& devices() const override { return devices_; }
  int64_t used_bytes(const std::string&) override { return -1; }

 private:
  std::vector<DeviceInfo> devices_;
};

}  // namespace

std::unique_ptr<DeviceMonitor> DeviceMonitor::create(const Config& cfg, std::string* log) {
  if (cfg.executor == "slurm") {
    // One device: the partition. Slurm places each job on a node and a GPU; memfitd's queue
    // stops when the partition's shards are all reserved, and no job gets more than one GPU.
    const SlurmConfig& s = cfg.slurm;
    const int64_t gpu = s.shard_memory * s.shards_per_gpu;
    DeviceInfo d{"slurm:" + s.partition, s.device, "Slurm partition " + s.partition, gpu * s.gpus, 0, gpu};
    *log += "device " + d.name + ": " + std::to_string(s.gpus) + " GPUs x " + std::to_string(s.shards_per_gpu) +
            " shards of " + estimator::format_size(s.shard_memory) + " (Slurm; a job gets shards of one GPU)\n";
    return std::make_unique<Configured>(std::vector<DeviceInfo>{d});
  }
  if (!cfg.devices.empty()) {
    std::vector<DeviceInfo> d;
    for (const auto& c : cfg.devices) {
      const bool cuda = c.name.rfind("cuda:", 0) == 0;
      d.push_back({c.name, cuda ? "cuda" : "cpu", "configured", c.memory_bytes, std::stoi(c.name.substr(cuda ? 5 : 4))});
      *log += "device " + c.name + ": " + estimator::format_size(c.memory_bytes) + " (configured)\n";
    }
    return std::make_unique<Configured>(std::move(d));
  }
  if (cfg.gpus) {
    if (auto n = Nvml::open(log)) return n;
  }
  std::vector<DeviceInfo> d;
  for (int i = 0; i < cfg.cpu_devices; ++i) {
    d.push_back({"cpu:" + std::to_string(i), "cpu", "configured", cfg.cpu_device_memory, i});
    *log += "device cpu:" + std::to_string(i) + ": " + estimator::format_size(cfg.cpu_device_memory) +
            " (CPU; workers run with --memory-limit set to their reservation)\n";
  }
  return std::make_unique<Configured>(std::move(d));
}

}  // namespace memfit::daemon
