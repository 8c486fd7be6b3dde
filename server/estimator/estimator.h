// memfit's memory estimator: a job's peak device memory before it runs.
//
// It replays a training step of memfit-worker on a model of the device's allocator and
// of LibTorch's autograd (sim.h, op_table.h): every tensor the worker's ops allocate, keep for
// backward or free, in the same order, with the same sizes. Plain structs in, integer
// bytes out; no LibTorch, no gRPC.
//
//   memfit::estimator::Input in;
//   in.job = job;                                  // spec::Job (method, memory, training)
//   in.config = memfit::model::load_config(job.config_path, job.architecture);
//   in.device = memfit::estimator::DeviceModel::cuda();
//   memfit::estimator::Estimate e = memfit::estimator::estimate(in);
//   e.peak_bytes, e.peak_phase, e.activations ...
#pragma once

#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

#include "job.h"
#include "model_config.h"

namespace memfit::estimator {

// A job the estimator cannot model, or sizes that make no sense; the message names the
// field.
class EstimateError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The device and the LibTorch build the worker runs with. The CUDA constants are named
// and overridable: they differ between drivers, GPUs and PyTorch versions, and learning
// from measured peaks (calibration.h) corrects what they miss.
struct DeviceModel {
  enum class Kind { kCPU, kCUDA };
  Kind kind = Kind::kCPU;
  int threads = 1;                          // CPU: the worker's compute threads
  // CUDA context, cuBLAS workspace and kernel images: memory the process holds on the
  // device outside the caching allocator.
  int64_t context_bytes = 0;
  int64_t alloc_granularity = 1;            // CUDA caching allocator: 512-byte blocks
  double reserved_overhead = 0.0;           // reserved beyond the allocator model's, / allocated
  int64_t workspace_bytes = 0;              // cuBLAS workspaces (LibTorch 2.x: in the allocator)
  bool mean_backward_keeps_input = true;    // LibTorch 1.13 (CPU builds); 2.x does not
  // Autograd adds a second gradient into the first in place (2.x) or forms old + new
  // (1.13, every dense buffer): a tied embedding's two [V, d] gradients need a third.
  bool grad_buffer_in_place = false;

  // Generic CUDA defaults, from the first measurement (NVIDIA H200, CUDA 13, PyTorch 2.11:
  // docs/GPU.md): the context and kernel images held 742-758 MiB outside the allocator;
  // 800 MiB also covers the fragmentation the allocator model misses on small jobs.
  static constexpr int64_t kCudaContextBytes = int64_t{800} << 20;
  static constexpr int64_t kCudaBlockBytes = 512;
  static constexpr double kCudaReservedOverhead = 0.08;
  static constexpr int64_t kCudaWorkspaceBytes = int64_t{64} << 20;
  static DeviceModel cpu(int threads);
  static DeviceModel cuda();
  // The constants measured on that GPU model (NVML's name, e.g. "NVIDIA H200"; see
  // cuda_constants()), else cuda()'s.
  static DeviceModel cuda(const std::string& gpu_model);
  const char* kind_name() const { return kind == Kind::kCPU ? "cpu" : "cuda"; }
};

// CUDA constants measured on one GPU model by scripts/gpu_check.sh (step 3, docs/GPU.md),
// with the PyTorch it ran: the estimator's defaults for that model.
struct CudaConstants {
  const char* gpu_model;      // NVML's name
  int64_t context_bytes;
  double reserved_overhead;
  int64_t workspace_bytes;
  const char* measured_with;  // PyTorch, CUDA and driver versions, date
};
const std::vector<CudaConstants>& cuda_constants();

struct Input {
  spec::Job job;              // architecture, task, method, LoRA, memory options, training
  model::ModelConfig config;  // from the job's config.json
  DeviceModel device;
  bool validation = false;    // the job evaluates (eval phase)
  bool load_weights = false;  // the job loads a checkpoint (init transients)
  int64_t source_image_size = 0;  // images: stored side length before resizing (0 = model's)
};

struct Item {
  std::string name;
  int64_t bytes = 0;
};

// What one layer keeps for backward, op by op (the first op to keep a buffer owns it).
struct LayerKept {
  std::string where;  // "embeddings", "layer 0", ..., "head"
  int64_t bytes = 0;
  std::vector<Item> ops;
};

struct Estimate {
  int64_t parameters = 0, trainable_parameters = 0;
  int64_t weights_bytes = 0;     // every parameter, LoRA factors included, in the job's dtype
  int64_t gradient_bytes = 0;    // gradients of the trainable parameters after backward
  int64_t optimizer_bytes = 0;   // AdamW m, v (+ fp32 master weights for bf16)
  int64_t batch_bytes = 0;       // one micro-batch's input tensors
  int64_t activation_bytes = 0;  // kept for backward when forward returns
  std::vector<LayerKept> activations;
  int64_t loss_bytes = 0;        // logits and loss buffers at the backward peak's start
  int64_t backward_transient_bytes = 0;  // the backward peak above weights, state and kept
  int64_t allocated_peak_bytes = 0;      // the tensors' peak (the worker's peak_memory_bytes)
  int64_t allocator_overhead_bytes = 0;  // CUDA: reserved beyond allocated at the peak
  int64_t context_bytes = 0;             // CUDA context
  int64_t peak_bytes = 0;                // what the device must have free for the job
  std::string peak_phase;                // init, batch, forward, backward, optimizer, eval, export
  std::map<std::string, int64_t> phase_peaks;  // allocated bytes per phase
  // Where the estimate takes a safe upper bound instead of the exact value, and by how
  // much at most it may exceed the measured peak for that reason (0 when exact).
  std::vector<std::string> bounds;
  int64_t bound_slack_bytes = 0;
};

// Validates the input (errors name the spec field or the config key) and estimates.
Estimate estimate(const Input& in);

// Integer sizes for people: "16GiB", "800MiB", "1.5GB", "123456". Throws
// EstimateError naming `what` on anything else.
int64_t parse_size(const std::string& text, const std::string& what);
std::string format_size(int64_t bytes);  // "1.23 GiB"

}  // namespace memfit::estimator
