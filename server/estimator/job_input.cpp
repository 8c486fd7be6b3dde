#include "job_input.h"

#include <fstream>

namespace memfit::estimator {

int64_t idx_image_side(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  unsigned char h[16];
  if (!f.read(reinterpret_cast<char*>(h), 16)) return 0;
  auto be = [&](int o) { return (int64_t{h[o]} << 24) | (int64_t{h[o + 1]} << 16) | (int64_t{h[o + 2]} << 8) | h[o + 3]; };
  if (be(0) != 0x803) return 0;
  return be(8) == be(12) ? be(8) : 0;
}

Input job_input(const spec::Job& job, const model::ModelConfig& config, const DeviceModel& device) {
  Input in;
  in.job = job;
  in.config = config;
  in.device = device;
  in.validation = !job.validation_path.empty();
  in.load_weights = !job.weights_path.empty();
  if (job.format == spec::DataFormat::kIdx) in.source_image_size = idx_image_side(job.train_path);
  return in;
}

}  // namespace memfit::estimator
