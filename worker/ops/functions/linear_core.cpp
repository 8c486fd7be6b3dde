#include "functions/linear_core.h"

#include <ATen/ATen.h>

#include "dispatch.h"
#include "functions/dropout_seed.h"
#include "kernels/dropout_bits.h"

namespace memfit::ops::detail {

bool has_lora(const LinearWeights& w) { return w.lora_a.defined(); }

bool needs_input_for_backward(const LinearWeights& w) {
  return w.weight.requires_grad() ||
         (has_lora(w) && (w.lora_a.requires_grad() || w.lora_b.requires_grad()));
}

bool lora_dropout_active(const LinearWeights& w, bool training) {
  return has_lora(w) && training && w.lora_dropout > 0.0;
}

void check_linear_weights(const char* op, const at::Tensor& x, const LinearWeights& w) {
  TORCH_CHECK(w.weight.defined(), op, ": weight is undefined");
  TORCH_CHECK(w.weight.dim() == 2, op, ": weight must be 2-D [out, in], got ", w.weight.sizes());
  TORCH_CHECK(x.dim() >= 1, op, ": input must have at least one dimension");
  const int64_t in = w.weight.size(1), out = w.weight.size(0);
  TORCH_CHECK(x.size(-1) == in, op, ": input has ", x.size(-1),
              " features in its last dimension but weight expects ", in);
  check_device(x, op);
  kernel_dtype(x, op);
  check_same(op, {x, w.weight}, {"input", "weight"});
  if (w.bias.defined()) {
    TORCH_CHECK(w.bias.dim() == 1 && w.bias.size(0) == out, op, ": bias must be [", out,
                "], got ", w.bias.sizes());
    check_same(op, {x, w.bias}, {"input", "bias"});
  }
  if (has_lora(w)) {
    TORCH_CHECK(w.lora_b.defined(), op, ": lora_a is given but lora_b is undefined");
    TORCH_CHECK(w.lora_a.dim() == 2 && w.lora_a.size(1) == in, op, ": lora_a must be [r, ", in,
                "], got ", w.lora_a.sizes());
    const int64_t r = w.lora_a.size(0);
    TORCH_CHECK(w.lora_b.dim() == 2 && w.lora_b.size(0) == out && w.lora_b.size(1) == r, op,
                ": lora_b must be [", out, ", ", r, "], got ", w.lora_b.sizes());
    TORCH_CHECK(w.lora_dropout >= 0.0 && w.lora_dropout < 1.0, op,
                ": lora_dropout must be in [0, 1), got ", w.lora_dropout);
    check_same(op, {x, w.lora_a, w.lora_b}, {"input", "lora_a", "lora_b"});
    for (const at::Tensor* t : {&w.lora_in_scale, &w.lora_in_shift}) {
      if (!t->defined()) continue;
      TORCH_CHECK(t->dim() == 1 && t->size(0) == in, op,
                  ": lora_in_scale/lora_in_shift must be [", in, "], got ", t->sizes());
      check_same(op, {x, *t}, {"input", "lora_in_scale/lora_in_shift"});
    }
  } else {
    TORCH_CHECK(!w.lora_b.defined(), op, ": lora_b is given but lora_a is undefined");
  }
}

namespace {

// The LoRA branch's input before dropout, as 2-D [T, in].
at::Tensor lora_input(const at::Tensor& x2, const LinearWeights& w) {
  at::Tensor z = x2;
  if (w.lora_in_scale.defined()) z = z * w.lora_in_scale;
  if (w.lora_in_shift.defined()) z = z + w.lora_in_shift;
  return z;
}

at::Tensor apply_mask(const at::Tensor& z, const at::Tensor& mask, double p) {
  at::Tensor zc = z.contiguous();
  at::Tensor out = at::empty_like(zc);
  dropout_apply(zc, mask, out, kernels::dropout_scale(p));  // the forward's scale
  return out;
}

}  // namespace

at::Tensor linear_forward(const at::Tensor& x, const LinearWeights& w, bool training,
                          at::Tensor* mask) {
  const int64_t in = w.weight.size(1), out = w.weight.size(0);
  const at::Tensor x2 = x.reshape({-1, in});
  at::Tensor y2 = w.bias.defined() ? at::addmm(w.bias, x2, w.weight.t()) : at::mm(x2, w.weight.t());
  if (has_lora(w)) {
    at::Tensor z = lora_input(x2, w);
    if (lora_dropout_active(w, training)) {
      at::Tensor zc = z.contiguous();
      at::Tensor zd = at::empty_like(zc);
      *mask = at::empty({kernels::packed1_bytes(zc.numel())}, zc.options().dtype(at::kByte));
      dropout_forward(zc, zd, *mask, w.lora_dropout, kernels::dropout_scale(w.lora_dropout),
                      next_dropout_seed());
      z = zd;
    }
    const at::Tensor xa = at::mm(z, w.lora_a.t());
    y2.addmm_(xa, w.lora_b.t(), 1.0, w.lora_scale);
  }
  std::vector<int64_t> sizes = x.sizes().vec();
  sizes.back() = out;
  return y2.view(sizes);
}

LinearGrads linear_backward(at::Tensor x, const at::Tensor& dy, const LinearWeights& w,
                            const at::Tensor& mask, const LinearNeeds& needs) {
  const int64_t in = w.weight.size(1), out = w.weight.size(0);
  const at::Tensor dy2 = dy.reshape({-1, out});
  LinearGrads g;
  // Weight and LoRA gradients first, so that x (which a fused caller recomputed just for
  // them) is released before the [T, in] input gradient is allocated.
  {
    at::Tensor x2;
    if (x.defined()) x2 = x.reshape({-1, in});
    if (needs.dweight) g.dweight = at::mm(dy2.t(), x2);
    if (needs.dbias) g.dbias = dy2.sum(0);
    at::Tensor dxa;  // scale * dy B: the gradient at the LoRA branch's rank-r bottleneck
    if (has_lora(w) && (needs.dx || needs.dlora_a || needs.dlora_b)) {
      dxa = at::mm(dy2, w.lora_b).mul_(w.lora_scale);
      if (needs.dlora_a || needs.dlora_b) {
        at::Tensor z = lora_input(x2, w);
        if (mask.defined()) z = apply_mask(z, mask, w.lora_dropout);
        if (needs.dlora_b) g.dlora_b = at::mm(dy2.t(), at::mm(z, w.lora_a.t())).mul_(w.lora_scale);
        if (needs.dlora_a) g.dlora_a = at::mm(dxa.t(), z);
      }
    }
    x2.reset();
    x.reset();
    if (needs.dx) {
      at::Tensor dx2 = at::mm(dy2, w.weight);
      if (dxa.defined()) {
        if (!mask.defined() && !w.lora_in_scale.defined()) {
          dx2.addmm_(dxa, w.lora_a);  // accumulate in place: no second [T, in] buffer
        } else {
          at::Tensor dz = at::mm(dxa, w.lora_a);
          if (mask.defined()) dz = apply_mask(dz, mask, w.lora_dropout);
          if (w.lora_in_scale.defined()) dz.mul_(w.lora_in_scale);
          dx2.add_(dz);
        }
      }
      std::vector<int64_t> sizes = dy.sizes().vec();
      sizes.back() = in;
      g.dx = dx2.view(sizes);
    }
  }
  return g;
}

}  // namespace memfit::ops::detail
