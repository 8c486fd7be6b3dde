// memfit::ops::attention: attention that keeps q, k, v, the output and one logsumexp
// per (batch, head, query), and recomputes the probabilities in backward, chunk by chunk
// of queries (FlashAttention's idea, with ATen matrix products between memfit's row
// kernels, kernels/attention_rows.h).
//
// Layouts: q [B, S, H, D]; k, v [B, Sk, Hk, D]; G = H / Hk query heads share a kv head.
// A chunk of c query positions is regrouped as [B * Hk, G * c, D] (row = g * c + i), so
// that one batched product against k in heads-major layout [B * Hk, Sk, D] covers every
// head of every sequence. Scores and probabilities are fp32 whatever the input dtype.
// The 1/sqrt(D) scale is folded into the regrouped queries.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "dispatch.h"
#include "functions/attention_impl.h"
#include "kernels/attention_rows.h"
#include "ops.h"

namespace memfit::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;
using namespace detail::attn;  // NOLINT: the geometry helpers of this op

// Positions [s0, s0 + c) of a [B, S, heads_kv * group, D] tensor -> [B * heads_kv,
// group * c, D] fp32, times mul. On CPU a memfit kernel (ATen's permute copies of this
// shape are ~10x slower than the products they feed); elsewhere ATen.
at::Tensor gather_rows(const at::Tensor& t, int64_t s0, int64_t c, int64_t heads_kv, int64_t group,
                       double mul) {
  const int64_t B = t.size(0), D = t.size(3);
  if (t.device().is_cpu() && t.stride(3) == 1) {
    at::Tensor out = at::empty({B * heads_kv, group * c, D}, t.options().dtype(at::kFloat));
    detail::attention_gather(t, layout_of(t, s0, c, heads_kv, group), mul, out);
    return out;
  }
  at::Tensor r = t.narrow(1, s0, c)
                     .to(at::kFloat)
                     .view({B, c, heads_kv, group, D})
                     .permute({0, 2, 3, 1, 4})
                     .reshape({B * heads_kv, group * c, D});
  return mul != 1.0 ? r.mul(mul) : r.clone(at::MemoryFormat::Contiguous);
}

// Inverse of gather_rows: writes block * mul into positions [s0, s0 + c) of dst.
void scatter_rows(const at::Tensor& grouped, const at::Tensor& dst, int64_t s0, int64_t heads_kv,
                  int64_t group, double mul = 1.0) {
  const int64_t B = dst.size(0), D = dst.size(3), c = grouped.size(1) / std::max<int64_t>(group, 1);
  if (dst.device().is_cpu() && dst.stride(3) == 1) {
    detail::attention_scatter(grouped, layout_of(dst, s0, c, heads_kv, group), mul, dst);
    return;
  }
  const at::Tensor src = grouped.view({B, heads_kv, group, c, D}).permute({0, 3, 1, 2, 4});
  dst.narrow(1, s0, c).view({B, c, heads_kv, group, D}).copy_(mul != 1.0 ? src * mul : src);
}

// [B, Sk, Hk, D] -> heads-major fp32 [B * Hk, Sk, D] (a transient copy).
at::Tensor heads_major(const at::Tensor& t, const Geometry& g) {
  return gather_rows(t, 0, g.Sk, g.Hk, 1, 1.0);
}

at::Tensor key_mask_bytes(const at::Tensor& key_padding) {
  return key_padding.defined() ? key_padding.to(at::kByte).contiguous() : at::Tensor();
}

struct AttentionFn : public torch::autograd::Function<AttentionFn> {
  // Keeps: q, k, v (as given), the output [B, S, H, D] (returned) and lse [B, H, S] fp32.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const OptTensor& key_padding, double scale,
                            bool causal, int64_t chunk_bytes, int64_t impl) {
    const Geometry g = geometry(q, k, scale, causal, chunk_bytes);
    const at::Tensor kpm = key_padding.has_value() ? *key_padding : at::Tensor();
    at::Tensor out = at::empty({g.B, g.S, g.H, g.D}, q.options());
    at::Tensor lse = at::empty({g.B, g.H, g.S}, q.options().dtype(at::kFloat));
    if (out.numel() > 0 && g.Sk > 0 && use_per_head(q, g, at::get_num_threads(), impl)) {
      forward_per_head(g, q, k, v, key_mask_bytes(kpm), out, lse, chunk_bytes);
    } else if (out.numel() > 0 && g.Sk > 0) {
      const at::Tensor mask = key_mask_bytes(kpm);
      const at::Tensor kh = heads_major(k, g), vh = heads_major(v, g);
      const at::Tensor lse4 = lse.view({g.B, g.Hk, g.G, g.S});
      for (int64_t s0 = 0; s0 < g.S; s0 += g.chunk) {
        const int64_t c = std::min(g.chunk, g.S - s0), len = key_limit(g, s0, c);
        const at::Tensor qg = gather_rows(q, s0, c, g.Hk, g.G, g.scale);
        at::Tensor p = at::bmm(qg, kh.narrow(1, 0, len).transpose(1, 2));  // [B*Hk, G*c, len]
        at::Tensor row_lse = at::empty({g.B * g.Hk, g.G * c}, lse.options());
        detail::attention_softmax_forward(rows_of(g, s0, c, len, mask), p, row_lse);
        scatter_rows(at::bmm(p, vh.narrow(1, 0, len)), out, s0, g.Hk, g.G);
        lse4.narrow(3, s0, c).copy_(row_lse.view({g.B, g.Hk, g.G, c}));
      }
    } else if (lse.numel() > 0) {
      out.zero_();
      lse.fill_(-std::numeric_limits<float>::infinity());
    }
    ctx->save_for_backward({q, k, v, out, lse, kpm});
    ctx->saved_data["scale"] = g.scale;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["chunk_bytes"] = chunk_bytes;
    ctx->saved_data["impl"] = impl;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &q = s[0], &k = s[1], &v = s[2], &out = s[3], &lse = s[4], &kpm = s[5];
    const Geometry g = geometry(q, k, ctx->saved_data["scale"].toDouble(),
                                ctx->saved_data["causal"].toBool(),
                                ctx->saved_data["chunk_bytes"].toInt());
    // The output's gradient in out's layout (autograd may hand over an expanded or
    // strided tensor), so that one pass can gather it and take rowsum(dO * O).
    const at::Tensor dout = grads[0].contiguous();
    if (q.numel() == 0 || g.Sk == 0) {
      return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()),
              at::zeros(v.sizes(), v.options()), at::Tensor(), at::Tensor(), at::Tensor(),
              at::Tensor(), at::Tensor()};
    }
    at::Tensor dq = at::empty(q.sizes(), q.options());  // every position is written below
    const at::Tensor mask = key_mask_bytes(kpm);
    const int64_t chunk_bytes = ctx->saved_data["chunk_bytes"].toInt();
    if (use_per_head(q, g, at::get_num_threads(), ctx->saved_data["impl"].toInt())) {
      at::Tensor dk = at::empty(k.sizes(), k.options()), dv = at::empty(v.sizes(), v.options());
      backward_per_head(g, q, k, v, out, lse, mask, dout, dq, dk, dv, chunk_bytes);
      return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
    }
    const at::Tensor kh = heads_major(k, g), vh = heads_major(v, g);
    // With one chunk over all keys the products write dk and dv directly; otherwise the
    // chunks accumulate into zeroed buffers.
    const bool one_chunk = g.chunk >= g.S && key_limit(g, 0, g.S) == g.Sk;
    at::Tensor dkh, dvh;
    if (!one_chunk) {
      dkh = at::zeros({g.B * g.Hk, g.Sk, g.D}, kh.options());
      dvh = at::zeros({g.B * g.Hk, g.Sk, g.D}, kh.options());
    }
    const at::Tensor lse4 = lse.view({g.B, g.Hk, g.G, g.S});
    const bool cpu_path = dout.device().is_cpu();
    // delta = rowsum(dO * O) per (batch, head, query), [B, H, S] like lse; on CPU it comes
    // out of the pass that gathers dO, chunk by chunk.
    at::Tensor delta4;
    if (!cpu_path) {
      delta4 = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1).permute({0, 2, 1}).contiguous()
                   .view({g.B, g.Hk, g.G, g.S});
    }
    for (int64_t s0 = 0; s0 < g.S; s0 += g.chunk) {
      const int64_t c = std::min(g.chunk, g.S - s0), len = key_limit(g, s0, c);
      const kernels::AttentionRows rows = rows_of(g, s0, c, len, mask);
      const at::Tensor qg = gather_rows(q, s0, c, g.Hk, g.G, g.scale);
      at::Tensor dog, row_delta;
      if (cpu_path) {
        dog = at::empty({g.B * g.Hk, g.G * c, g.D}, lse.options());
        row_delta = at::empty({g.B * g.Hk, g.G * c}, lse.options());
        detail::attention_gather(dout, layout_of(dout, s0, c, g.Hk, g.G), 1.0, dog, out, row_delta);
      } else {
        dog = gather_rows(dout, s0, c, g.Hk, g.G, 1.0);
        row_delta = delta4.narrow(3, s0, c).reshape({g.B * g.Hk, g.G * c}).contiguous();
      }
      const at::Tensor kc = kh.narrow(1, 0, len), vc = vh.narrow(1, 0, len);
      const at::Tensor row_lse = lse4.narrow(3, s0, c).reshape({g.B * g.Hk, g.G * c}).contiguous();
      at::Tensor p = at::bmm(qg, kc.transpose(1, 2));
      detail::attention_probs(rows, p, row_lse);
      // add_ of a product, not baddbmm_: LibTorch 1.13's CPU baddbmm_ into a narrowed
      // (non-contiguous) view gives wrong sums (caught by the causal multi-chunk tests).
      if (one_chunk) {
        dvh = at::bmm(p.transpose(1, 2), dog);
      } else {
        dvh.narrow(1, 0, len).add_(at::bmm(p.transpose(1, 2), dog));
      }
      at::Tensor ds = at::bmm(dog, vc.transpose(1, 2));  // dP
      detail::attention_dscores(rows, ds, p, row_delta);  // dS = P * (dP - delta)
      p.reset();
      scatter_rows(at::bmm(ds, kc), dq, s0, g.Hk, g.G, g.scale);
      if (one_chunk) {
        dkh = at::bmm(ds.transpose(1, 2), qg);  // qg carries the scale
      } else {
        dkh.narrow(1, 0, len).add_(at::bmm(ds.transpose(1, 2), qg));
      }
    }
    const auto back = [&](const at::Tensor& h, const at::Tensor& like) {
      at::Tensor out = at::empty(like.sizes(), like.options());
      scatter_rows(h, out, 0, g.Hk, 1);
      return out;
    };
    return {dq,           back(dkh, k), back(dvh, v), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const AttentionOptions& o) {
  const char* op = "memfit::ops::attention";
  TORCH_CHECK(q.defined() && k.defined() && v.defined(), op, ": q, k and v must be defined");
  TORCH_CHECK(q.dim() == 4, op, ": q must be [B, S, H, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4, op, ": k and v must be [B, Sk, Hk, D], got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k ", k.sizes(), " and v ", v.sizes(),
              " must have the same shape");
  TORCH_CHECK(q.size(0) == k.size(0), op, ": batch of q (", q.size(0), ") and k (", k.size(0),
              ") differ");
  TORCH_CHECK(q.size(3) == k.size(3), op, ": head_dim of q (", q.size(3), ") and k (", k.size(3),
              ") differ");
  TORCH_CHECK(k.size(2) > 0 ? q.size(2) % k.size(2) == 0 : q.size(2) == 0, op,
              ": q heads (", q.size(2), ") must be a multiple of kv heads (", k.size(2), ")");
  detail::check_device(q, op);
  detail::kernel_dtype(q, op);
  detail::check_same(op, {q, k, v}, {"q", "k", "v"});
  TORCH_CHECK(o.scale >= 0.0 && std::isfinite(o.scale), op,
              ": scale must be >= 0 (0 = 1/sqrt(D)), got ", o.scale);
  TORCH_CHECK(o.chunk_bytes > 0, op, ": chunk_bytes must be > 0, got ", o.chunk_bytes);
  TORCH_CHECK(o.impl != AttentionImpl::kPerHead || q.device().is_cpu(), op,
              ": impl kPerHead runs on CPU only, q is on ", q.device());
  if (o.key_padding_mask.defined()) {
    const at::Tensor& m = o.key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": key_padding_mask must be bool, got ",
                m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == q.size(0) && m.size(1) == k.size(1), op,
                ": key_padding_mask must be [", q.size(0), ", ", k.size(1), "], got ", m.sizes());
    TORCH_CHECK(m.device() == q.device(), op, ": key_padding_mask is on ", m.device(),
                " but q is on ", q.device());
  }
}

}  // namespace

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const AttentionOptions& opts) {
  check_inputs(q, k, v, opts);
  const OptTensor kpm =
      opts.key_padding_mask.defined() ? OptTensor(opts.key_padding_mask) : OptTensor();
  return AttentionFn::apply(q, k, v, kpm, opts.scale, opts.causal, opts.chunk_bytes,
                            static_cast<int64_t>(opts.impl));
}

}  // namespace memfit::ops
