#include "dispatch.h"

#include <c10/util/Exception.h>

#include "kernels/dropout_bits.h"

#if MEMFIT_WITH_CUDA
#include "dispatch_cuda.h"
#endif

namespace memfit::ops::detail {
namespace k = memfit::kernels;

kernels::DType kernel_dtype(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return k::DType::kFloat32;
    case at::kBFloat16: return k::DType::kBFloat16;
    case at::kHalf: return k::DType::kFloat16;
    default:
      TORCH_CHECK(false, op, ": expected a float32, bfloat16 or float16 tensor, got ",
                  t.scalar_type());
  }
}

void check_device(const at::Tensor& t, const char* op) {
  if (t.device().is_cpu()) return;
#if MEMFIT_WITH_CUDA
  if (t.device().is_cuda()) return;
#else
  TORCH_CHECK(!t.device().is_cuda(), op, ": got a tensor on ", t.device(),
              " but this memfit build has no CUDA kernels (configure with -DMEMFIT_CUDA=ON "
              "against a CUDA LibTorch)");
#endif
  TORCH_CHECK(false, op, ": tensors on ", t.device(), " are not supported (CPU or CUDA only)");
}

void check_same(const char* op, std::initializer_list<std::reference_wrapper<const at::Tensor>> ts,
                std::initializer_list<const char*> names) {
  const at::Tensor& first = ts.begin()->get();
  auto name = names.begin();
  const char* first_name = *name;
  for (const at::Tensor& t : ts) {
    TORCH_CHECK(t.device() == first.device(), op, ": ", *name, " is on ", t.device(), " but ",
                first_name, " is on ", first.device());
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), op, ": ", *name, " has dtype ",
                t.scalar_type(), " but ", first_name, " has dtype ", first.scalar_type());
    ++name;
  }
}

namespace {
// Runs the CUDA launcher in a CUDA build when t is on a GPU, else the CPU body.
template <typename CpuFn, typename CudaFn>
void run(const at::Tensor& t, CpuFn&& cpu, [[maybe_unused]] CudaFn&& cuda) {
  if (t.device().is_cpu()) {
    cpu();
    return;
  }
#if MEMFIT_WITH_CUDA
  run_on_cuda(t, cuda);
#else
  TORCH_INTERNAL_ASSERT(false, "CUDA tensor reached a CPU-only build's dispatch");
#endif
}
// Kernels index raw buffers densely: every tensor handed to one must be contiguous.
template <typename T>
T* ptr(const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.is_contiguous(), "memfit kernel given a non-contiguous buffer");
  return static_cast<T*>(t.data_ptr());
}
void* raw(const at::Tensor& t) { return ptr<void>(t); }
}  // namespace

void approx_act_forward(k::ApproxAct act, const at::Tensor& x, const at::Tensor& y,
                        const at::Tensor& flags) {
  const auto dt = kernel_dtype(x, "memfit approx activation");
  const int64_t n = x.numel();
  run(x, [&] { k::approx_act_forward_cpu(act, dt, raw(x), raw(y), ptr<uint8_t>(flags), n); },
      [&](void* s) { k::approx_act_forward_cuda(act, dt, raw(x), raw(y), ptr<uint8_t>(flags), n, s); });
}

void approx_act_backward(k::ApproxAct act, const at::Tensor& dy, const at::Tensor& flags,
                         const at::Tensor& dx) {
  const auto dt = kernel_dtype(dy, "memfit approx activation backward");
  const int64_t n = dy.numel();
  run(dy, [&] { k::approx_act_backward_cpu(act, dt, raw(dy), ptr<uint8_t>(flags), raw(dx), n); },
      [&](void* s) { k::approx_act_backward_cuda(act, dt, raw(dy), ptr<uint8_t>(flags), raw(dx), n, s); });
}

void ms_norm_forward(k::NormKind kind, const at::Tensor& x, const at::Tensor& y,
                     const at::Tensor& rstd, double eps) {
  const auto dt = kernel_dtype(x, "memfit ms_norm");
  const int64_t cols = x.dim() == 0 ? 1 : x.size(-1);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  const float e = static_cast<float>(eps);
  run(x, [&] { k::ms_norm_forward_cpu(kind, dt, raw(x), raw(y), ptr<float>(rstd), rows, cols, e); },
      [&](void* s) { k::ms_norm_forward_cuda(kind, dt, raw(x), raw(y), ptr<float>(rstd), rows, cols, e, s); });
}

void ms_norm_backward(k::NormKind kind, const at::Tensor& dy, const at::Tensor& y,
                      const at::Tensor& rstd, const at::Tensor& dx) {
  const auto dt = kernel_dtype(dy, "memfit ms_norm backward");
  const int64_t cols = dy.dim() == 0 ? 1 : dy.size(-1);
  const int64_t rows = cols == 0 ? 0 : dy.numel() / cols;
  run(dy, [&] { k::ms_norm_backward_cpu(kind, dt, raw(dy), raw(y), ptr<float>(rstd), raw(dx), rows, cols); },
      [&](void* s) { k::ms_norm_backward_cuda(kind, dt, raw(dy), raw(y), ptr<float>(rstd), raw(dx), rows, cols, s); });
}

void dropout_forward(const at::Tensor& x, const at::Tensor& y, const at::Tensor& mask, double p,
                     float scale, uint64_t seed) {
  const auto dt = kernel_dtype(x, "memfit dropout");
  const int64_t n = x.numel();
  const float pf = static_cast<float>(p);
  run(x, [&] { k::dropout_forward_cpu(dt, raw(x), raw(y), ptr<uint8_t>(mask), n, pf, scale, seed); },
      [&](void* s) { k::dropout_forward_cuda(dt, raw(x), raw(y), ptr<uint8_t>(mask), n, pf, scale, seed, s); });
}

void dropout_apply(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& y, float scale) {
  const auto dt = kernel_dtype(x, "memfit dropout apply");
  const int64_t n = x.numel();
  run(x, [&] { k::dropout_apply_cpu(dt, raw(x), ptr<uint8_t>(mask), raw(y), n, scale); },
      [&](void* s) { k::dropout_apply_cuda(dt, raw(x), ptr<uint8_t>(mask), raw(y), n, scale, s); });
}

void act_forward(k::Act act, const at::Tensor& x, const at::Tensor& h) {
  const auto dt = kernel_dtype(x, "memfit activation");
  const int64_t n = x.numel();
  run(x, [&] { k::act_forward_cpu(act, dt, raw(x), raw(h), n); },
      [&](void* s) { k::act_forward_cuda(act, dt, raw(x), raw(h), n, s); });
}

void act_backward(k::Act act, const at::Tensor& x, const at::Tensor& dh, const at::Tensor& dx) {
  const auto dt = kernel_dtype(x, "memfit activation backward");
  const int64_t n = x.numel();
  run(x, [&] { k::act_backward_cpu(act, dt, raw(x), raw(dh), raw(dx), n); },
      [&](void* s) { k::act_backward_cuda(act, dt, raw(x), raw(dh), raw(dx), n, s); });
}

void swiglu_forward(const at::Tensor& g, const at::Tensor& u, const at::Tensor& h) {
  const auto dt = kernel_dtype(g, "memfit swiglu");
  const int64_t n = g.numel();
  run(g, [&] { k::swiglu_forward_cpu(dt, raw(g), raw(u), raw(h), n); },
      [&](void* s) { k::swiglu_forward_cuda(dt, raw(g), raw(u), raw(h), n, s); });
}

void swiglu_backward(const at::Tensor& g, const at::Tensor& u, const at::Tensor& dh,
                     const at::Tensor& dg, const at::Tensor& du) {
  const auto dt = kernel_dtype(g, "memfit swiglu backward");
  const int64_t n = g.numel();
  run(g, [&] { k::swiglu_backward_cpu(dt, raw(g), raw(u), raw(dh), raw(dg), raw(du), n); },
      [&](void* s) { k::swiglu_backward_cuda(dt, raw(g), raw(u), raw(dh), raw(dg), raw(du), n, s); });
}

void attention_softmax_forward(const k::AttentionRows& g, const at::Tensor& s, const at::Tensor& lse) {
  run(s, [&] { k::attention_softmax_forward_cpu(g, ptr<float>(s), ptr<float>(lse)); },
      [&](void* st) { k::attention_softmax_forward_cuda(g, ptr<float>(s), ptr<float>(lse), st); });
}

void attention_probs(const k::AttentionRows& g, const at::Tensor& s, const at::Tensor& lse) {
  run(s, [&] { k::attention_probs_cpu(g, ptr<float>(s), ptr<float>(lse)); },
      [&](void* st) { k::attention_probs_cuda(g, ptr<float>(s), ptr<float>(lse), st); });
}

void attention_dscores(const k::AttentionRows& g, const at::Tensor& dp, const at::Tensor& p,
                       const at::Tensor& delta) {
  run(dp, [&] { k::attention_dscores_cpu(g, ptr<float>(dp), ptr<float>(p), ptr<float>(delta)); },
      [&](void* st) { k::attention_dscores_cuda(g, ptr<float>(dp), ptr<float>(p), ptr<float>(delta), st); });
}

void attention_gather(const at::Tensor& t, const k::HeadsLayout& l, double scale,
                      const at::Tensor& out, const at::Tensor& dot_with, const at::Tensor& dot) {
  TORCH_INTERNAL_ASSERT(t.device().is_cpu() && t.stride(3) == 1);
  const void* other = nullptr;
  float* dots = nullptr;
  if (dot_with.defined()) {
    TORCH_INTERNAL_ASSERT(dot_with.strides() == t.strides() && dot_with.scalar_type() == t.scalar_type());
    other = dot_with.data_ptr();
    dots = ptr<float>(dot);
  }
  k::attention_gather_cpu(kernel_dtype(t, "memfit attention"), t.data_ptr(), l,
                          static_cast<float>(scale), ptr<float>(out), other, dots);
}

void attention_scatter(const at::Tensor& block, const k::HeadsLayout& l, double scale,
                       const at::Tensor& t) {
  TORCH_INTERNAL_ASSERT(t.device().is_cpu() && t.stride(3) == 1);
  k::attention_scatter_cpu(kernel_dtype(t, "memfit attention"), ptr<float>(block), l,
                           static_cast<float>(scale), t.data_ptr());
}

}  // namespace memfit::ops::detail
