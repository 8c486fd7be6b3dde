// Transformer models built from a Hugging Face config.json, with memfit's memory modes.
// Weights load from and export to Hugging Face tensor names; with memory-sharing norms
// the norms' affine parameters are merged into the following linear layers after load
// and unmerged at export, so exported files load in Hugging Face tools unchanged.
//
//   auto m = memfit::model::Model::create(job, cfg, device);   // random init (seeded)
//   m->load(checkpoint);                                       // optional
//   m->prepare();                                              // method + memory modes
//   Output out = m->forward(batch, /*training=*/true);
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model_config.h"
#include "ops.h"
#include "safetensors.h"
#include "spec.h"

namespace memfit::model {

struct Batch {
  at::Tensor input_ids;       // [B, S] int64 (text)
  at::Tensor attention_mask;  // [B, S] bool, true = real token; undefined = all real
  at::Tensor labels;          // causal LM: [B, S] int64, -100 = ignored; classification: [B]
  at::Tensor pixels;          // [B, C, H, W] float (images)
};

struct Output {
  at::Tensor loss;     // mean over counted targets (scalar)
  at::Tensor logits;   // only when Model::keep_logits(true): [B, S, V] or [B, C]
  int64_t count = 0;   // targets in the loss (tokens or samples)
  int64_t correct = 0; // classification: right predictions (eval only)
};

struct Norm {
  std::string module;  // e.g. "transformer.h.0.ln_1"
  bool rms = false;
  double eps = 1e-5;
  at::Tensor gamma, beta;  // beta undefined for RMSNorm
  bool merged = false;     // its affine lives in the following linear layers
};

struct Linear {
  std::string module;        // e.g. "transformer.h.0.attn.c_attn"
  std::string short_name;    // e.g. "c_attn" (LoRA target matching)
  bool conv1d = false;       // GPT-2 Conv1D: stored [in, out] in the checkpoint
  bool in_block = true;      // LoRA default targets: linears of the transformer blocks
  at::Tensor weight, bias;   // [out, in], [out]; merged with `norm` if norm != nullptr
  at::Tensor lora_a, lora_b;
  double lora_scale = 1.0, lora_dropout = 0.0;
  const Norm* norm = nullptr;  // the norm merged into this layer
  bool had_bias = true;        // bias existed before any merge
  ops::LinearWeights weights() const;
};

class Model {
 public:
  static std::unique_ptr<Model> create(const spec::Job& job, const ModelConfig& cfg);
  virtual ~Model() = default;

  const ModelConfig& config() const { return cfg_; }
  // Loads every tensor the model has from a checkpoint. Missing or unexpected names and
  // wrong shapes are listed in one IoError. Newly added heads (a classifier on a base
  // model) may be missing: they keep their initialisation and are reported in *fresh.
  void load(const io::Checkpoint& ckpt, std::vector<std::string>* fresh);
  // Applies the job's method (what trains, LoRA) and memory modes (merges norms for
  // memory sharing), then moves everything to `device` in the job's dtype.
  void prepare(const at::Device& device);
  virtual Output forward(const Batch& batch, bool training) = 0;

  // Tests and tools: also return the logits (they then stay alive with the Output).
  void keep_logits(bool on) { keep_logits_ = on; }
  // Gradients of every tensor that has one, by Hugging Face name and in the checkpoint's
  // layout (Conv1D transposed). Meaningful without memory-sharing norms (merged
  // weights have no Hugging Face counterpart).
  std::vector<std::pair<std::string, at::Tensor>> grads() const;

  std::vector<at::Tensor> trainable() const;
  int64_t trainable_count() const;
  int64_t parameter_count() const;
  // Norm parameters (scale and shift) that full fine-tuning would train but memory-sharing
  // norms folded into the following linear layers: they train as part of those layers'
  // weights and biases and are unfolded at export. 0 when nothing was folded or they
  // would not have trained.
  int64_t folded_norm_parameters() const { return folded_norm_parameters_; }
  // Hugging Face-named tensors as they should be exported: unmerged, Conv1D transposed,
  // fp32 or the job's dtype, on CPU.
  std::vector<std::pair<std::string, at::Tensor>> export_state() const;
  // The trainable LoRA factors and heads, named as PEFT saves them.
  std::vector<std::pair<std::string, at::Tensor>> export_adapter() const;
  std::vector<std::string> lora_modules() const;
  // Top-level modules of the task head ("classifier", "score"), PEFT's modules_to_save.
  std::vector<std::string> head_modules() const;
  // export_state() restricted to the names `want` accepts.
  std::vector<std::pair<std::string, at::Tensor>> export_tensors(
      const std::function<bool(const std::string&)>& want) const;
  // The state the trainer checkpoints and restores (trainable tensors by stable name).
  std::vector<std::pair<std::string, at::Tensor>> trainable_state() const;

 protected:
  Model(const spec::Job& job, const ModelConfig& cfg);
  // Registration, in creation order. Returns the new tensor.
  at::Tensor& param(const std::string& name, std::vector<int64_t> shape, double std, bool is_head = false);
  at::Tensor& ones(const std::string& name, int64_t n);
  at::Tensor& zeros(const std::string& name, std::vector<int64_t> shape, bool is_head = false);
  Linear& linear(const std::string& module, int64_t in, int64_t out, bool bias, bool conv1d = false,
                 bool in_block = true, bool is_head = false);
  Norm& norm(const std::string& module, int64_t d, bool rms, bool bias);
  // Called at the end of prepare(), after tensors moved to the device.
  virtual void on_prepared();
  // Call at the start of every forward: drops what the previous step's checkpointed
  // blocks held.
  void begin_forward() const;
  // Declares that `n`'s output feeds exactly these linears (and nothing else that needs
  // the affine), so that memory-sharing mode may merge n into them.
  void feeds(Norm& n, std::vector<Linear*> into);

  // Building blocks for the forward passes.
  at::Tensor apply_norm(const Norm& n, const at::Tensor& x) const;  // affine included unless merged
  at::Tensor affine(const Norm& n, const at::Tensor& y) const;      // y * gamma + beta
  at::Tensor apply_linear(const Linear& l, const at::Tensor& x, bool training) const;
  at::Tensor activation(const at::Tensor& x) const;
  // act(x) -> down, using the fused tail when the job asks for it.
  at::Tensor mlp_tail(const at::Tensor& z, const Linear& down, bool training) const;
  // Whether the causal-LM loss may run fused through this head.
  bool fused_loss_ok(const Linear* head) const;
  at::Tensor swiglu_tail(const at::Tensor& g, const at::Tensor& u, const Linear& down, bool training) const;
  // q: [B, S, H, D]; k, v: [B, S, Hk, D]; returns [B, S, H * D].
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool causal,
                    const at::Tensor& key_mask) const;
  // Runs fn(x) as one checkpointed block when the job asks for activation checkpointing.
  // fn runs again during backward, after forward() returned: it must capture by value.
  at::Tensor block(const std::function<at::Tensor(const at::Tensor&)>& fn, const at::Tensor& x,
                   bool training) const;

  spec::Job job_;
  ModelConfig cfg_;
  at::Device device_ = at::Device(at::kCPU);
  std::map<std::string, at::Tensor> params_;     // every HF-named tensor (not Linears')
  std::map<std::string, bool> head_;             // names of task-head tensors
  std::vector<std::unique_ptr<Linear>> linears_;
  std::vector<std::unique_ptr<Norm>> norms_;
  std::map<const Norm*, std::vector<Linear*>> feeds_;
  std::vector<std::string> order_;               // registration order of tensor names
  mutable std::vector<std::shared_ptr<std::function<at::Tensor(const at::Tensor&)>>> checkpoint_fns_;
  bool keep_logits_ = false;
  int64_t folded_norm_parameters_ = 0;
};

// Losses shared by the architectures. logits [B, S, V] / labels [B, S] (-100 ignored;
// position t predicts token t + 1), or logits [B, C] / labels [B].
Output causal_lm_loss(const at::Tensor& logits, const at::Tensor& labels, bool training, bool keep_logits);
// The same loss from the final hidden states and the head weight through
// ops::linear_cross_entropy (the logits never exist). h: [B, S, d]; weight: [V, d].
Output fused_causal_lm_loss(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& labels);
Output classification_loss(const at::Tensor& logits, const at::Tensor& labels, bool training, bool keep_logits);

}  // namespace memfit::model
