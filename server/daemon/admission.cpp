// Admission: what a submitted spec becomes (paths checked and placed, validated, estimated,
// calibrated, reserved). Runs without the core's lock but for calibration.
#include <unistd.h>

#include <algorithm>

#include "core.h"
#include "fit.h"
#include "model_config.h"
#include "report.h"
#include "spec.h"

namespace memfit::daemon {
namespace {

v1::MemorySpec memory_spec(const spec::Memory& m) { return spec::memory_to_spec(m); }

std::string size(int64_t b) { return estimator::format_size(b); }

CoreError from(const PathError& e) {
  switch (e.kind) {
    case PathError::Kind::kInvalid: return CoreError(Code::kInvalidArgument, e.what());
    case PathError::Kind::kDenied: return CoreError(Code::kPermissionDenied, e.what());
    case PathError::Kind::kPrecondition: return CoreError(Code::kFailedPrecondition, e.what());
  }
  return CoreError(Code::kInvalidArgument, e.what());
}

}  // namespace

estimator::DeviceModel Core::device_model() const {
  const auto& d = devices_.devices();
  const bool cuda = !d.empty() && d.front().kind == "cuda";
  if (cuda) return estimator::DeviceModel::cuda(d.front().model);
  int threads = cfg_.worker_threads;
  if (threads <= 0) {
    const int cores = static_cast<int>(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)));
    threads = std::max(1, cores / std::max<int>(1, static_cast<int>(d.size())));
  }
  return estimator::DeviceModel::cpu(threads);
}

Core::Admission Core::admit(const Caller& c, const v1::JobSpec& spec_in, const std::string& job_id,
                            int64_t device_bytes, bool for_submit) {
  Admission a;
  v1::JobSpec s = spec_in;
  const bool auto_memory = s.memory().preset() == "auto";
  if (auto_memory) s.mutable_memory()->set_preset("");
  // Paths first, before anything reads a file: each input beneath the caller's read
  // roots, a regular file of bounded size, opened as the worker will open it.
  std::string config_text;
  try {
    a.output = DecideOutput(rules_, c.user, job_id, s.output_dir());
    s.set_output_dir(a.output.dir);
    struct In {
      const char* field;
      const std::string& path;
      bool folder_ok, weights;
    };
    // config.json first (read, not only checked: memfitd parses it), then the others.
    if (!s.model().config_path().empty()) {
      config_text = ReadInput(rules_, c.user, "model.config_path", s.model().config_path(), int64_t{16} << 20);
    }
    const In inputs[] = {{"model.weights_path", s.model().weights_path(), false, true},
                         {"data.train_path", s.data().train_path(), false, false},
                         {"data.validation_path", s.data().validation_path(), false, false},
                         {"data.tokenizer_path", s.data().tokenizer_path(), true, false},
                         {"data.train_labels_path", s.data().train_labels_path(), false, false},
                         {"data.validation_labels_path", s.data().validation_labels_path(), false, false}};
    for (const auto& in : inputs) {
      if (in.path.empty()) continue;
      CheckInput(rules_, c.user, in.field, in.path, in.folder_ok, in.weights);
    }
    if (for_submit) CheckOutput(a.output);
  } catch (const PathError& e) {
    throw from(e);
  }
  spec::Job job;
  model::ModelConfig mc;
  try {
    job = spec::resolve(s, "spec", "/");
    mc = model::parse_config(config_text, job.config_path, job.architecture);
  } catch (const spec::SpecError& e) {
    throw CoreError(Code::kInvalidArgument, e.what());
  } catch (const model::ConfigError& e) {
    throw CoreError(Code::kInvalidArgument, e.what());
  }
  estimator::Input in;
  in.job = job;
  in.config = mc;
  in.device = device_model();
  in.validation = !job.validation_path.empty();
  in.load_weights = !job.weights_path.empty();
  a.input = in;
  try {
    a.estimate = estimator::estimate(in);
    if (auto_memory) {
      const estimator::FitPlan plan = estimator::fit(in, device_bytes);
      a.plan.set_level(plan.fits ? plan.level : "none");
      for (const auto& r : plan.reasons) a.plan.add_reasons(r);
      if (plan.fits) {
        in.job.memory = plan.memory;
        in.job.training.micro_batch = plan.micro_batch;
        in.job.training.gradient_accumulation = plan.gradient_accumulation;
        a.estimate = estimator::estimate(in);
        *s.mutable_memory() = memory_spec(plan.memory);
        s.mutable_training()->set_micro_batch(plan.micro_batch);
        s.mutable_training()->set_gradient_accumulation(plan.gradient_accumulation);
      }
    }
  } catch (const estimator::EstimateError& e) {
    throw CoreError(Code::kInvalidArgument, e.what());
  }
  // What memfit's ops save: the same job with the stock ops (checkpointing as asked).
  try {
    estimator::Input stock = in;
    stock.job.memory = spec::Memory{};
    stock.job.memory.efficient_attention = false;
    stock.job.memory.checkpointing = in.job.memory.checkpointing;
    a.plan.set_exact_activation_bytes(estimator::estimate(stock).activation_bytes);
  } catch (const estimator::EstimateError&) {
    a.plan.set_exact_activation_bytes(a.estimate.activation_bytes);
  }
  a.plan.set_activation_bytes(a.estimate.activation_bytes);
  a.key = estimator::Calibration::key_of(in);
  // With slurm.run_as: submitter the worker runs as the job's owner, who can write what it
  // reports (worker.out is theirs, and so is the process): its measured peaks, and its
  // out-of-memory failures, calibrate only that owner's later jobs, never another user's.
  if (cfg_.executor == "slurm" && cfg_.slurm.run_as == "submitter") a.key += "|owner:" + c.user;
  int64_t calibrated = 0;
  {
    absl::MutexLock lock(&mu_);
    calibrated = calibration_.apply(a.key, a.estimate.peak_bytes);
  }
  a.plan.set_calibration_key(a.key);
  a.plan.set_estimated_peak_bytes(a.estimate.peak_bytes);
  a.plan.set_calibrated_peak_bytes(calibrated);
  a.plan.set_reserved_bytes(policy_.reserve(calibrated));
  if (!s.resources().memory().empty()) {
    try {
      const int64_t declared = estimator::parse_size(s.resources().memory(), "resources.memory");
      if (declared <= 0) throw CoreError(Code::kInvalidArgument, "resources.memory: must be more than 0");
      a.plan.set_reserved_bytes(declared);
      a.plan.add_reasons("resources.memory: " + size(declared) + " reserved as declared (the estimate with margin is " +
                         size(policy_.reserve(calibrated)) + ")");
    } catch (const estimator::EstimateError& e) {
      throw CoreError(Code::kInvalidArgument, e.what());
    }
  }
  a.plan.set_micro_batch(in.job.training.micro_batch);
  a.plan.set_gradient_accumulation(in.job.training.gradient_accumulation);
  a.plan.set_compute_kind(ComputeKindOf(in));
  *a.plan.mutable_memory() = memory_spec(in.job.memory);
  a.worker_spec = s;
  a.estimate_json = estimator::to_json(a.estimate).dump();
  return a;
}

}  // namespace memfit::daemon
