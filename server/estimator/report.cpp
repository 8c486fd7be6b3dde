#include "report.h"

namespace memfit::estimator {

using json = nlohmann::ordered_json;

json to_json(const Estimate& e) {
  json acts = json::array();
  for (const auto& L : e.activations) {
    json ops = json::array();
    for (const auto& o : L.ops) ops.push_back({{"op", o.name}, {"bytes", o.bytes}});
    acts.push_back({{"where", L.where}, {"bytes", L.bytes}, {"ops", ops}});
  }
  json phases = json::object();
  for (const auto& [k, v] : e.phase_peaks) phases[k] = v;
  return {{"peak_bytes", e.peak_bytes},
          {"peak_phase", e.peak_phase},
          {"allocated_peak_bytes", e.allocated_peak_bytes},
          {"allocator_overhead_bytes", e.allocator_overhead_bytes},
          {"context_bytes", e.context_bytes},
          {"breakdown",
           {{"weights_bytes", e.weights_bytes},
            {"gradient_bytes", e.gradient_bytes},
            {"optimizer_bytes", e.optimizer_bytes},
            {"batch_bytes", e.batch_bytes},
            {"activation_bytes", e.activation_bytes},
            {"loss_bytes", e.loss_bytes},
            {"backward_transient_bytes", e.backward_transient_bytes}}},
          {"activations", acts},
          {"phase_peaks", phases},
          {"bounds", e.bounds},
          {"bound_slack_bytes", e.bound_slack_bytes},
          {"parameters", e.parameters},
          {"trainable_parameters", e.trainable_parameters}};
}

json to_json(const spec::Memory& m) {
  return {{"approx_activation", m.approx_activation}, {"memory_sharing_norm", m.memory_sharing_norm},
          {"fused_mlp", m.fused_mlp},                 {"fused_loss", m.fused_loss},
          {"efficient_attention", m.efficient_attention}, {"checkpointing", m.checkpointing}};
}

json to_json(const FitPlan& p) {
  return {{"fits", p.fits},
          {"device_bytes", p.device_bytes},
          {"micro_batch", p.micro_batch},
          {"gradient_accumulation", p.gradient_accumulation},
          {"level", p.level},
          {"memory", to_json(p.memory)},
          {"peak_bytes", p.estimate.peak_bytes},
          {"smallest_bytes", p.smallest_bytes},
          {"points_searched", p.points_searched},
          {"reasons", p.reasons}};
}

}  // namespace memfit::estimator
