// memfit::ops::linear_cross_entropy: the language-model head and its loss in one pass
// over row chunks, with the gradient formed in forward (the loss is the graph's end, so
// d loss / d logits is known up to the scalar that backward brings).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>

#include "dispatch.h"
#include "ops.h"

namespace memfit::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Tests may run the CUDA path's order of products on the CPU (its numerics).
bool g_low_precision_products_everywhere = false;

int64_t rows_per_chunk(int64_t vocab, int64_t chunk_bytes) {
  return std::max<int64_t>(1, chunk_bytes / std::max<int64_t>(1, vocab * 4));
}

struct LinearCrossEntropyFn : public torch::autograd::Function<LinearCrossEntropyFn> {
  // Keeps: dL/dh [T, d] (h's dtype) and, if W needs a gradient, dL/dW [V, d] fp32.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& weight,
                            const at::Tensor& labels, int64_t chunk_bytes, bool build_grads) {
    const int64_t T = h.size(0), V = weight.size(0);
    const at::Tensor valid = labels.ne(-100);
    const int64_t count = valid.sum().item<int64_t>();
    const bool grads = build_grads;
    // bf16 on CUDA: the products run in the job's dtype on the tensor cores (fp32
    // accumulation) and only the [c, V] logits block is fp32, as in the unfused head and
    // loss; an fp32 copy of the head (V x d) and fp32 products would cost many times the
    // step (docs/GPU.md). On the CPU, and in fp32, every product is fp32.
    // (bf16 only: fp16's range would flush most of softmax / count to zero.)
    const bool low = h.scalar_type() == at::kBFloat16 && weight.scalar_type() == h.scalar_type() &&
                     (h.is_cuda() || g_low_precision_products_everywhere);
    const at::Tensor wf = low ? at::Tensor() : weight.to(at::kFloat);
    at::Tensor dh = grads && h.requires_grad() ? at::empty(h.sizes(), h.options()) : at::Tensor();
    at::Tensor dw = grads && weight.requires_grad() ? at::zeros(weight.sizes(), weight.options().dtype(at::kFloat))
                                                    : at::Tensor();
    // The loss summed on the device: one read at the end, not a synchronisation per chunk.
    at::Tensor total = at::zeros({}, h.options().dtype(at::kDouble));
    const int64_t step = rows_per_chunk(V, chunk_bytes);
    for (int64_t r0 = 0; r0 < T; r0 += step) {
      const int64_t c = std::min(step, T - r0);
      const at::Tensor hs = h.narrow(0, r0, c);
      const at::Tensor hc = low ? at::Tensor() : hs.to(at::kFloat);
      const at::Tensor yc = labels.narrow(0, r0, c);
      const at::Tensor vc = valid.narrow(0, r0, c);
      const at::Tensor safe = yc.masked_fill(vc.logical_not(), 0).unsqueeze(1);
      // [c, V] fp32, the only such block alive (low: its product in the job's dtype first).
      at::Tensor logits = low ? at::mm(hs, weight.t()).to(at::kFloat) : at::mm(hc, wf.t());
      const at::Tensor picked = logits.gather(1, safe);
      // logsumexp in place (at::logsumexp would allocate a second [c, V] block):
      // e = exp(logits - max), lse = log(sum e) + max.
      const at::Tensor mx = std::get<0>(logits.max(1, /*keepdim=*/true));
      logits.sub_(mx).exp_();
      const at::Tensor se = logits.sum(1, /*keepdim=*/true);
      const at::Tensor lse = se.log().add_(mx);
      total.add_(((lse - picked).squeeze(1) * vc).sum());
      if (!grads || count == 0) continue;
      // d loss / d logits = (softmax - onehot) * valid / count, formed in place.
      logits.div_(se);
      logits.scatter_add_(1, safe, at::full({c, 1}, -1.0, logits.options()));
      logits.mul_(vc.unsqueeze(1).to(at::kFloat) / static_cast<double>(count));
      if (dh.defined()) {
        dh.narrow(0, r0, c).copy_(low ? at::mm(logits.to(h.scalar_type()), weight) : at::mm(logits, wf));
      }
      if (dw.defined()) dw.addmm_(logits.t(), low ? hs.to(at::kFloat) : hc);
    }
    // No row counts (every label -100): the loss is 0 and so is its gradient; dh was
    // never written.
    if (dh.defined() && count == 0) dh.zero_();
    ctx->save_for_backward({dh, dw});
    ctx->saved_data["weight_dtype"] = static_cast<int64_t>(weight.scalar_type());
    const double loss = count > 0 ? total.item<double>() / static_cast<double>(count) : 0.0;
    return at::scalar_tensor(loss, h.options().dtype(at::kFloat));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor g = grads[0].to(at::kFloat);
    at::Tensor dh = s[0].defined() ? s[0] * g.to(s[0].scalar_type()) : at::Tensor();
    at::Tensor dw;
    if (s[1].defined()) {
      dw = (s[1] * g).to(static_cast<at::ScalarType>(ctx->saved_data["weight_dtype"].toInt()));
    }
    return {dh, dw, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

namespace detail {
void low_precision_loss_products_everywhere(bool on) { g_low_precision_products_everywhere = on; }
}  // namespace detail

at::Tensor linear_cross_entropy(const at::Tensor& h, const at::Tensor& weight, const at::Tensor& labels,
                                int64_t chunk_bytes) {
  const char* op = "memfit::ops::linear_cross_entropy";
  TORCH_CHECK(h.defined() && weight.defined() && labels.defined(), op, ": h, weight and labels must be defined");
  TORCH_CHECK(h.dim() == 2, op, ": h must be [T, d], got ", h.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == h.size(1), op, ": weight must be [V, ", h.size(1), "], got ",
              weight.sizes());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == h.size(0), op, ": labels must be [", h.size(0), "], got ",
              labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, op, ": labels must be int64, got ", labels.scalar_type());
  TORCH_CHECK(chunk_bytes > 0, op, ": chunk_bytes must be > 0");
  detail::check_device(h, op);
  detail::kernel_dtype(h, op);
  detail::check_same(op, {h, weight}, {"h", "weight"});
  const at::Tensor valid_labels = labels.masked_select(labels.ne(-100));
  if (valid_labels.numel() > 0) {
    TORCH_CHECK(valid_labels.min().item<int64_t>() >= 0 && valid_labels.max().item<int64_t>() < weight.size(0), op,
                ": labels must be in [0, ", weight.size(0), ") or -100");
  }
  // Gradients are formed in forward only when a backward can follow.
  const bool build = at::GradMode::is_enabled() && (h.requires_grad() || weight.requires_grad());
  return LinearCrossEntropyFn::apply(h, weight, labels, chunk_bytes, build);
}

}  // namespace memfit::ops
