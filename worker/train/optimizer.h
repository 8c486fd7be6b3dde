// AdamW (decoupled weight decay, as torch.optim.AdamW) with fp32 state, and the
// learning-rate schedule. Parameters stored in bf16 keep an fp32 master copy here.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "spec.h"

namespace memfit::train {

class AdamW {
 public:
  AdamW(std::vector<std::pair<std::string, at::Tensor>> params, double weight_decay,
        double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8);
  // One update with learning rate lr from the parameters' .grad (undefined grads skip).
  void step(double lr);
  void zero_grad();
  // Global L2 norm of the gradients; scales them to max_norm if above. Returns the norm
  // before clipping.
  double clip_grad_norm(double max_norm);
  int64_t steps() const { return t_; }
  // State for checkpoints: name -> tensor (m, v, master) plus the step count.
  std::vector<std::pair<std::string, at::Tensor>> state() const;
  void load_state(const std::vector<std::pair<std::string, at::Tensor>>& state, int64_t steps);

 private:
  struct Slot {
    std::string name;
    at::Tensor param, m, v, master;  // master: fp32 copy when param is not fp32
    bool decay;
  };
  std::vector<Slot> slots_;
  double wd_, b1_, b2_, eps_;
  int64_t t_ = 0;
};

// The sum of g's squared elements, accumulated in double without copying g (on CPU; on
// CUDA the device's fp32 tree reduction, squared in double). clip_grad_norm adds these
// over every gradient: GPT-2's 4.8M-element embedding gradient reduced in fp32 on the
// CPU put the norm 8.4e-5 (relative) low.
double sum_of_squares(const at::Tensor& g);

// Learning rate at optimizer step `step` (0-based) of `total`: linear warmup from 0,
// then constant, linear decay to 0, or cosine decay to 0.
double learning_rate(const spec::Training& t, int64_t step, int64_t total);

}  // namespace memfit::train
