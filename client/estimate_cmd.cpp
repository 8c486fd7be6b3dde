// memfit estimate: the memory estimator on a spec file, no daemon needed.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "commands.h"
#include "remote.h"
#include "estimator.h"
#include "fit.h"
#include "model_config.h"
#include "report.h"
#include "spec.h"

namespace memfit::cli {
namespace {

using json = nlohmann::ordered_json;
namespace est = memfit::estimator;

struct Args {
  std::string spec;
  std::string device;  // "" = the spec's
  int64_t device_memory = 0;
  int threads = 0;
  bool json_out = false;
  int64_t cuda_context = -1;     // -1: DeviceModel's default
  double reserved_overhead = -1;  // -1: DeviceModel's default
  std::vector<std::string> remote;  // --server/--token/--tls-ca given: ask memfitd
};

class Usage : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

Args parse(const std::vector<std::string>& a) {
  Args r;
  auto value = [&](size_t& i, const std::string& flag) -> std::string {
    if (i + 1 >= a.size()) throw Usage(flag + ": needs a value");
    return a[++i];
  };
  for (size_t i = 0; i < a.size(); ++i) {
    const std::string& f = a[i];
    if (f == "-f" || f == "--file") {
      r.spec = value(i, f);
    } else if (f == "--device-memory") {
      r.device_memory = est::parse_size(value(i, f), "--device-memory");
    } else if (f == "--device") {
      r.device = value(i, f);
      if (r.device != "cpu" && r.device.rfind("cuda", 0) != 0) {
        throw Usage("--device: expected cpu or cuda, got '" + r.device + "'");
      }
    } else if (f == "--threads") {
      const std::string v = value(i, f);
      char* end = nullptr;
      const long n = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || n < 1 || n > 65536) throw Usage("--threads: expected 1..65536, got '" + v + "'");
      r.threads = static_cast<int>(n);
    } else if (f == "--cuda-context") {
      r.cuda_context = est::parse_size(value(i, f), "--cuda-context");
    } else if (f == "--reserved-overhead") {
      const std::string v = value(i, f);
      char* end = nullptr;
      const double x = std::strtod(v.c_str(), &end);
      if (v.empty() || *end != '\0' || !(x >= 0.0 && x < 10.0)) {
        throw Usage("--reserved-overhead: expected a fraction in [0, 10), got '" + v + "'");
      }
      r.reserved_overhead = x;
    } else if (f == "-o" || f == "--output") {
      const std::string v = value(i, f);
      if (v != "json" && v != "text") throw Usage(f + ": expected json or text, got '" + v + "'");
      r.json_out = v == "json";
    } else if (f == "--server" || f == "--token" || f == "--tls-ca") {
      r.remote.push_back(f);
      r.remote.push_back(value(i, f));
    } else {
      throw Usage("unknown option '" + f + "'");
    }
  }
  if (r.spec.empty()) throw Usage("-f SPEC is required");
  return r;
}

// The side length of the stored images (IDX header), when the file is plain IDX.
int64_t idx_side(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  unsigned char h[16];
  if (!f.read(reinterpret_cast<char*>(h), 16)) return 0;
  auto be = [&](int o) { return (int64_t{h[o]} << 24) | (int64_t{h[o + 1]} << 16) | (int64_t{h[o + 2]} << 8) | h[o + 3]; };
  if (be(0) != 0x803) return 0;
  return be(8) == be(12) ? be(8) : 0;
}

void print_text(const spec::Job& job, const est::Input& in, const est::Estimate& e, const est::FitPlan* plan) {
  using est::format_size;
  const auto& t = job.training;
  std::printf("%s: %s %s, %s, micro-batch %lld x %lld, %s, on %s\n", job.name.c_str(), spec::name_of(job.architecture),
              spec::name_of(job.task), spec::name_of(job.method), static_cast<long long>(t.micro_batch),
              static_cast<long long>(t.gradient_accumulation),
              t.dtype == spec::DType::kBFloat16 ? "bf16" : "fp32", in.device.kind_name());
  std::printf("\n  peak                   %12s   in %s\n", format_size(e.peak_bytes).c_str(), e.peak_phase.c_str());
  if (e.context_bytes > 0 || e.allocator_overhead_bytes > 0) {
    std::printf("    tensors              %12s\n", format_size(e.allocated_peak_bytes).c_str());
    std::printf("    allocator overhead   %12s\n", format_size(e.allocator_overhead_bytes).c_str());
    std::printf("    CUDA context         %12s\n", format_size(e.context_bytes).c_str());
  }
  std::printf("\n  weights                %12s   %lld parameters\n", format_size(e.weights_bytes).c_str(),
              static_cast<long long>(e.parameters));
  std::printf("  gradients              %12s   %lld trainable\n", format_size(e.gradient_bytes).c_str(),
              static_cast<long long>(e.trainable_parameters));
  std::printf("  optimizer state        %12s   AdamW\n", format_size(e.optimizer_bytes).c_str());
  std::printf("  batch                  %12s\n", format_size(e.batch_bytes).c_str());
  std::printf("  activations kept       %12s\n", format_size(e.activation_bytes).c_str());
  for (const auto& L : e.activations) {
    std::printf("    %-20s %12s  ", L.where.c_str(), format_size(L.bytes).c_str());
    std::string ops;
    for (const auto& o : L.ops) ops += (ops.empty() ? "" : ", ") + o.name + " " + format_size(o.bytes);
    std::printf("%s\n", ops.c_str());
  }
  std::printf("  logits and loss        %12s\n", format_size(e.loss_bytes).c_str());
  std::printf("  backward transient     %12s\n", format_size(e.backward_transient_bytes).c_str());
  std::printf("\n  peak by phase:");
  for (const char* p : {"init", "batch", "forward", "backward", "optimizer", "eval", "export"}) {
    auto it = e.phase_peaks.find(p);
    if (it != e.phase_peaks.end()) std::printf(" %s %s;", p, format_size(it->second).c_str());
  }
  std::printf("\n");
  if (plan != nullptr) {
    std::printf("\nfit in %s: %s\n", format_size(plan->device_bytes).c_str(),
                plan->fits ? ("micro-batch " + std::to_string(plan->micro_batch) + " x " +
                              std::to_string(plan->gradient_accumulation) + " accumulation, " + plan->level)
                                 .c_str()
                           : ("does not fit; needs at least " + format_size(plan->smallest_bytes)).c_str());
    for (const auto& r : plan->reasons) std::printf("  - %s\n", r.c_str());
  }
}

}  // namespace

// The daemon's estimate: its devices, worker threads and calibration apply.
int estimate_remote(const Args& a) {
  std::vector<std::string> flags = a.remote;
  const Common c = parse_common(flags);
  Remote r(c);
  const spec::Job job = spec::load_job(a.spec);
  v1::EstimateJobRequest req;
  *req.mutable_spec() = spec_for_daemon(a.spec);
  req.set_device_bytes(a.device_memory);
  v1::EstimateJobResponse out;
  auto ctx = r.context();
  r.check(r.cluster().EstimateJob(ctx.get(), req, &out), "estimate");
  if (a.json_out) {
    json e = json::parse(out.estimate_json());
    e["plan"] = json::parse(to_json(out.plan(), false));
    e["fits"] = out.fits();
    std::cout << e.dump(2) << "\n";
  } else {
    const auto& p = out.plan();
    std::printf("%s on memfitd at %s\n", job.name.c_str(), r.address().c_str());
    std::printf("  estimated peak   %12s\n", est::format_size(p.estimated_peak_bytes()).c_str());
    std::printf("  calibrated       %12s   (%s)\n", est::format_size(p.calibrated_peak_bytes()).c_str(),
                p.calibration_key().c_str());
    std::printf("  would reserve    %12s   %s\n", est::format_size(p.reserved_bytes()).c_str(),
                out.fits() ? "fits" : "does not fit");
    std::printf("  activations      %12s   (%s with the stock ops)\n", est::format_size(p.activation_bytes()).c_str(),
                est::format_size(p.exact_activation_bytes()).c_str());
    for (const auto& why : p.reasons()) std::printf("  - %s\n", why.c_str());
  }
  return kExitOk;
}

const char* kEstimateHelp =
    "usage: memfit estimate -f SPEC [--device-memory SIZE] [--device cpu|cuda] [--threads N]\n"
    "                       [--cuda-context SIZE] [--reserved-overhead FRACTION] [-o text|json]\n"
    "                       [--server HOST:PORT [--token T] [--tls-ca FILE]]\n"
    "  Predict the job's peak device memory with a breakdown, without running it. With\n"
    "  --device-memory, also the largest micro-batch and cheapest memory options that fit.\n"
    "  With --server, memfitd answers: its devices, worker threads and calibration apply,\n"
    "  and it says what it would reserve. Sizes: 16GiB, 800MiB, 80GB or plain bytes.\n"
    "  example: memfit estimate -f lora.yaml --device cuda --device-memory 80GiB\n";

int estimate_cmd(const std::vector<std::string>& argv) {
  for (const auto& a : argv) {
    if (a == "-h" || a == "--help") {
      std::cout << kEstimateHelp;
      return kExitOk;
    }
  }
  try {
    const Args a = parse(argv);
    if (!a.remote.empty()) return estimate_remote(a);
    const spec::Job job = spec::load_job(a.spec);
    est::Input in;
    in.job = job;
    in.config = model::load_config(job.config_path, job.architecture);
    const std::string dev = a.device.empty() ? job.device : a.device;
    if (dev.rfind("cuda", 0) == 0) {
      in.device = est::DeviceModel::cuda();
      if (a.cuda_context >= 0) in.device.context_bytes = a.cuda_context;
      if (a.reserved_overhead >= 0) in.device.reserved_overhead = a.reserved_overhead;
    } else {
      in.device = est::DeviceModel::cpu(a.threads > 0 ? a.threads
                                                      : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
    }
    in.validation = !job.validation_path.empty();
    in.load_weights = !job.weights_path.empty();
    if (job.format == spec::DataFormat::kIdx) in.source_image_size = idx_side(job.train_path);
    const est::Estimate e = est::estimate(in);
    est::FitPlan plan;
    if (a.device_memory > 0) plan = est::fit(in, a.device_memory);
    if (a.json_out) {
      json out = est::to_json(e);
      out["device"] = {{"kind", in.device.kind_name()},
                       {"threads", in.device.threads},
                       {"context_bytes", in.device.context_bytes},
                       {"alloc_granularity", in.device.alloc_granularity},
                       {"reserved_overhead", in.device.reserved_overhead}};
      if (a.device_memory > 0) {
        out["fit"] = est::to_json(plan);
      }
      std::cout << out.dump(2) << "\n";
    } else {
      print_text(job, in, e, a.device_memory > 0 ? &plan : nullptr);
    }
    return kExitOk;
  } catch (const Usage& e) {
    std::cerr << "memfit estimate: " << e.what() << "\n";
    return kExitBadInput;
  } catch (const CliError& e) {
    std::cerr << "memfit estimate: " << e.what() << "\n";
    return e.code;
  } catch (const spec::SpecError& e) {
    std::cerr << "memfit estimate: " << e.what() << "\n";
    return kExitBadInput;
  } catch (const model::ConfigError& e) {
    std::cerr << "memfit estimate: " << e.what() << "\n";
    return kExitBadInput;
  } catch (const est::EstimateError& e) {
    std::cerr << "memfit estimate: " << e.what() << "\n";
    return kExitBadInput;
  } catch (const std::exception& e) {
    std::cerr << "memfit estimate: " << e.what() << "\n";
    return kExitError;
  }
}

}  // namespace memfit::cli
