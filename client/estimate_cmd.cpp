// memfit estimate: the memory estimator on a spec file, no daemon needed.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "commands.h"
#include "remote.h"
#include "estimator.h"
#include "fit.h"
#include "job_input.h"
#include "model_config.h"
#include "report.h"
#include "spec.h"
#include "text.h"

namespace memfit::cli {
namespace {

using json = nlohmann::ordered_json;
namespace est = memfit::estimator;

void print_text(const spec::Job& job, const est::Input& in, const est::Estimate& e, const est::FitPlan* plan) {
  using est::format_size;
  const auto& t = job.training;
  std::printf("%s: %s %s, %s, micro-batch %lld x %lld, %s, on %s\n", printable(job.name).c_str(), spec::name_of(job.architecture),
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
  for (const auto& b : e.bounds) std::printf("  a safe bound: %s\n", b.c_str());
  if (job.memory.preset == "auto" && plan == nullptr) {
    std::printf("\nmemory.preset is auto: memfitd fits the options and micro-batch to its device; "
                "--device-memory SIZE shows that plan here (above: the spec's own options)\n");
  }
  if (plan != nullptr) {
    std::printf("\nfit in %s: %s\n", format_size(plan->device_bytes).c_str(),
                plan->fits ? ("micro-batch " + std::to_string(plan->micro_batch) + " x " +
                              std::to_string(plan->gradient_accumulation) + " accumulation, " + plan->level)
                                 .c_str()
                           : ("does not fit; needs at least " + format_size(plan->smallest_bytes)).c_str());
    for (const auto& r : plan->reasons) std::printf("  - %s\n", printable(r).c_str());
  }
}

// The plan as a spec that memfit submit and memfit-worker run as is: the original spec
// with absolute paths, the plan's micro-batch and accumulation, and every memory option
// explicit. Written next to FILE and renamed over it.
void write_plan_spec(const std::string& source, const std::string& target, const est::FitPlan& plan) {
  namespace fs = std::filesystem;
  std::error_code ec;
  if (fs::equivalent(source, target, ec)) {
    throw CliError(kExitBadInput, "--write-spec: " + target + " is the spec being estimated; choose another file");
  }
  v1::JobSpec s = spec_for_daemon(source);
  spec::Memory m = plan.memory;
  if (m.preset == "auto") m.preset.clear();
  *s.mutable_memory() = spec::memory_to_spec(m);
  s.mutable_training()->set_micro_batch(plan.micro_batch);
  s.mutable_training()->set_gradient_accumulation(plan.gradient_accumulation);
  const std::string tmp = target + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << to_json(s, true, /*all_fields=*/false) << "\n";  // a spec: only what is set
    out.close();
    if (!out) throw CliError(kExitError, "--write-spec: cannot write " + tmp);
  }
  fs::rename(tmp, target, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw CliError(kExitError, "--write-spec: cannot write " + target);
  }
}

}  // namespace

// The daemon's estimate: its devices, worker threads and calibration apply.
static int estimate_remote(const Invocation& inv) {
  const EstimateArgs& a = inv.estimate;
  Remote r(inv.common);
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
    std::cout << e.dump(2, ' ', false, json::error_handler_t::replace) << "\n";
  } else {
    const auto& p = out.plan();
    std::printf("%s on memfitd at %s\n", printable(job.name).c_str(), printable(r.address()).c_str());
    std::printf("  estimated peak   %12s\n", est::format_size(p.estimated_peak_bytes()).c_str());
    std::printf("  calibrated       %12s   (%s)\n", est::format_size(p.calibrated_peak_bytes()).c_str(),
                printable(p.calibration_key()).c_str());
    std::printf("  would reserve    %12s   %s\n", est::format_size(p.reserved_bytes()).c_str(),
                out.fits() ? "fits" : "does not fit");
    std::printf("  activations      %12s   (%s with the stock ops)\n", est::format_size(p.activation_bytes()).c_str(),
                est::format_size(p.exact_activation_bytes()).c_str());
    for (const auto& why : p.reasons()) std::printf("  - %s\n", printable(why).c_str());
  }
  return kExitOk;
}

int estimate_cmd(const Invocation& inv) {
  // Messages may quote the spec file's (or memfitd's) strings: escaped before printing.
  auto fail = [](const std::exception& e, int code) {
    std::fflush(stdout);
    std::cerr << "memfit estimate: " << printable(e.what()) << "\n";
    return code;
  };
  try {
    const EstimateArgs& a = inv.estimate;
    if (!a.write_spec.empty() && a.device_memory <= 0) {
      throw CliError(kExitBadInput, "--write-spec needs --device-memory: the plan is for that much memory");
    }
    if (a.remote) {
      if (!a.write_spec.empty()) throw CliError(kExitBadInput, "--write-spec: only without a connection flag");
      return estimate_remote(inv);
    }
    const spec::Job job = spec::load_job(a.spec);
    est::DeviceModel device;
    const std::string dev = a.device.empty() ? job.device : a.device;
    if (dev.rfind("cuda", 0) == 0) {
      device = est::DeviceModel::cuda(a.gpu_model);
      if (a.cuda_context >= 0) device.context_bytes = a.cuda_context;
      if (a.reserved_overhead >= 0) device.reserved_overhead = a.reserved_overhead;
    } else {
      device = est::DeviceModel::cpu(a.threads > 0 ? a.threads
                                                   : static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
    }
    const est::Input in = est::job_input(job, model::load_config(job.config_path, job.architecture), device);
    const est::Estimate e = est::estimate(in);
    est::FitPlan plan;
    if (a.device_memory > 0) plan = est::fit(in, a.device_memory);
    if (!a.write_spec.empty()) write_plan_spec(a.spec, a.write_spec, plan);
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
      std::cout << out.dump(2, ' ', false, json::error_handler_t::replace) << "\n";
    } else {
      print_text(job, in, e, a.device_memory > 0 ? &plan : nullptr);
    }
    if (!a.write_spec.empty()) {
      std::fflush(stdout);
      std::fprintf(stderr, "memfit estimate: wrote %s: %s\n", printable(a.write_spec).c_str(),
                   plan.fits ? ("micro-batch " + std::to_string(plan.micro_batch) + " x " +
                                std::to_string(plan.gradient_accumulation) + ", " + plan.level)
                                   .c_str()
                             : ("the smallest plan, which does not fit: it needs " +
                                est::format_size(plan.smallest_bytes))
                                   .c_str());
    }
    return kExitOk;
  } catch (const CliError& e) {
    return fail(e, e.code);
  } catch (const spec::SpecError& e) {
    return fail(e, kExitBadInput);
  } catch (const model::ConfigError& e) {
    return fail(e, kExitBadInput);
  } catch (const est::EstimateError& e) {
    return fail(e, kExitBadInput);
  } catch (const std::exception& e) {
    return fail(e, kExitError);
  }
}

}  // namespace memfit::cli
