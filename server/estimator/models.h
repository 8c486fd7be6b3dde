// Internal to the estimator: the worker's four architectures (worker/model/*.cpp) replayed
// on the simulator, op for op, with the same parameter registration, method and memory
// modes. A change to a model's forward pass must be mirrored here; the accuracy grid
// (tests/estimator/accuracy.py) fails otherwise.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "estimator.h"
#include "op_table.h"
#include "sim.h"

namespace memfit::estimator::sim {

struct Batch {
  Tensor ids, mask, labels, pixels;
  int64_t B = 0, S = 0;
};

struct SimNorm {
  std::string module;
  bool rms = false;
  int64_t d = 0;
  Tensor gamma, beta;
  bool has_beta = false;
  bool merged = false;
};

struct SimLinear {
  std::string module, short_name;
  std::string label, fused_label, swiglu_label;  // names in the kept breakdown
  int64_t in = 0, out = 0;
  bool has_bias = true, conv1d = false, in_block = true, head = false;
  Tensor weight, bias, lora_a, lora_b;
  int64_t rank = 0;
  double lora_dropout = 0.0;
  const SimNorm* norm = nullptr;  // merged into this layer
  LinearW w() const;
};

struct SimParam {
  std::string name;
  int64_t numel = 0;
  bool head = false;
  Tensor t;
};

class SimModel {
 public:
  static std::unique_ptr<SimModel> create(const Input& in, Sim& s, const Runtime& rt);
  virtual ~SimModel() = default;

  // The worker's init: create (fp32), load, LoRA, merges, move to the device and dtype.
  // On CUDA only the final tensors reach the device.
  void materialize(bool load_weights);
  virtual Tensor forward(const Batch& b, bool training) = 0;

  // Trainable tensors in the worker's trainable_state() order.
  std::vector<Tensor> trainable() const;
  // What a trainable tensor's .grad holds once formed, in bytes: its own size, unless
  // the gradient is a view that keeps a larger storage alive (the accumulation shadow).
  virtual int64_t grad_held_bytes(const Tensor& t, int64_t micro_batch) const;
  int64_t parameter_count() const;
  int64_t trainable_count() const;
  int64_t weight_bytes() const;
  // Export at the end: full weights (unmerged, Conv1D transposed) or the adapter.
  void simulate_export();

 protected:
  SimModel(const Input& in, Sim& s, const Runtime& rt);
  SimParam& param(const std::string& name, int64_t numel, bool head = false);
  SimLinear& linear(const std::string& module, int64_t in, int64_t out, bool bias, bool conv1d = false,
                    bool in_block = true, bool head = false);
  SimNorm& norm(const std::string& module, int64_t d, bool rms, bool bias);
  void feeds(SimNorm& n, std::vector<SimLinear*> into);
  const Tensor& p(const std::string& name) const;

  Tensor apply_norm(const SimNorm& n, const Tensor& x, int64_t rows);
  Tensor apply_linear(const SimLinear& l, const Tensor& x, int64_t rows, bool training);
  Tensor activation(const Tensor& x);
  Tensor mlp_tail(const Tensor& z, int64_t rows, const SimLinear& down, bool training);
  Tensor swiglu_tail(const Tensor& g, const Tensor& u, int64_t rows, const SimLinear& down, bool training);
  Tensor attend(const Tensor& q, const Tensor& k, const Tensor& v, const AttnShape& a, const Tensor& key_mask);
  Tensor block(const std::function<Tensor(const Tensor&)>& fn, const Tensor& x, bool training);
  bool fused_loss_ok(const SimLinear* head) const;
  // Causal-LM losses (model.cpp).
  Tensor causal_lm_loss(const Tensor& logits, const Batch& b, int64_t vocab);
  Tensor fused_causal_lm_loss(const Tensor& h, const Tensor& weight, const Batch& b);
  Tensor classification_loss(const Tensor& logits, int64_t B, int64_t classes);
  // Logits of each sequence's last real token (decoder classification).
  Tensor last_token(const Tensor& h, const Batch& b);
  // The LM head and loss of a decoder over its final hidden states h [B, S, d].
  Tensor lm_loss(const Tensor& h, const Batch& b, const SimLinear* head, const std::string& tied);

  const Input& in_;
  const spec::Job& job_;
  const model::ModelConfig& cfg_;
  Sim& s_;
  const Runtime& rt_;
  int64_t esize_ = 4;  // the job's dtype
  std::vector<std::unique_ptr<SimParam>> params_;
  std::vector<std::unique_ptr<SimLinear>> linears_;
  std::vector<std::unique_ptr<SimNorm>> norms_;
  std::vector<std::pair<SimNorm*, std::vector<SimLinear*>>> feeds_;
  std::vector<std::string> order_;
  Tensor anchor_;
};

}  // namespace memfit::estimator::sim
