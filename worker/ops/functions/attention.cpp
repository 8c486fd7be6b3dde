// memfit::ops::attention: attention that keeps q, k, v, the output and one logsumexp
// per (batch, head, query), and recomputes the probabilities in backward in query
// chunks (the idea of FlashAttention, written with ATen matrix products).
//
// Layouts: q [B, S, H, D]; k, v [B, Sk, Hk, D]; G = H / Hk query heads share a kv head.
// Inside, a query chunk of c rows of batch element b is regrouped as [Hk, G * c, D]
// (row index = g * c + i) so that one bmm against k[b] viewed as [Hk, Sk, D] covers
// all heads. Scores and probabilities are fp32 whatever the input dtype.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "dispatch.h"
#include "ops.h"

namespace memfit::ops {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = c10::optional<at::Tensor>;

struct Geometry {
  int64_t B, S, H, D, Sk, Hk, G;
  double scale;
  bool causal;
  int64_t chunk;  // query rows per chunk
};

Geometry geometry(const at::Tensor& q, const at::Tensor& k, double scale, bool causal,
                  int64_t chunk_bytes) {
  Geometry g{};
  g.B = q.size(0); g.S = q.size(1); g.H = q.size(2); g.D = q.size(3);
  g.Sk = k.size(1); g.Hk = k.size(2); g.G = g.H / std::max<int64_t>(g.Hk, 1);
  g.scale = scale > 0.0 ? scale : 1.0 / std::sqrt(static_cast<double>(std::max<int64_t>(g.D, 1)));
  g.causal = causal;
  // One chunk's score block is H * c * Sk fp32 values; backward holds two such blocks.
  const int64_t row_bytes = std::max<int64_t>(1, g.H * g.Sk * 4);
  g.chunk = std::clamp<int64_t>(chunk_bytes / row_bytes, 1, std::max<int64_t>(g.S, 1));
  return g;
}

// [c, H, D] slice of a [B, S, H, D] tensor -> [Hk, G * c, D] fp32 contiguous.
at::Tensor group_rows(const at::Tensor& t_bc, const Geometry& g) {
  const int64_t c = t_bc.size(0);
  return t_bc.to(at::kFloat)
      .view({c, g.Hk, g.G, g.D})
      .permute({1, 2, 0, 3})
      .reshape({g.Hk, g.G * c, g.D});
}

// Inverse of group_rows, written into dst ([c, H, D] slice, any dtype).
void ungroup_rows_into(const at::Tensor& grouped, const at::Tensor& dst, const Geometry& g) {
  const int64_t c = dst.size(0);
  dst.view({c, g.Hk, g.G, g.D}).copy_(grouped.view({g.Hk, g.G, c, g.D}).permute({2, 0, 1, 3}));
}

// Additive mask for one chunk: [1, G * c, Sk] (or [1, 1, Sk] without causality), or
// undefined when nothing is masked.
at::Tensor chunk_mask(const Geometry& g, int64_t b, int64_t s0, int64_t c,
                      const at::Tensor& key_padding) {
  at::Tensor masked;  // bool, true = hidden
  const auto opts = at::TensorOptions().device(key_padding.defined() ? key_padding.device()
                                                                     : at::Device(at::kCPU));
  if (g.causal) {
    const at::Tensor qi = at::arange(s0, s0 + c, opts.dtype(at::kLong)).view({c, 1});
    const at::Tensor kj = at::arange(0, g.Sk, opts.dtype(at::kLong)).view({1, g.Sk});
    masked = kj.gt(qi + (g.Sk - g.S));                                  // [c, Sk]
    masked = masked.unsqueeze(0).expand({g.G, c, g.Sk}).reshape({1, g.G * c, g.Sk});
  }
  if (key_padding.defined()) {
    const at::Tensor pad = key_padding[b].logical_not().view({1, 1, g.Sk});
    masked = masked.defined() ? masked.logical_or(pad) : pad;
  }
  return masked;
}

// Scores of one chunk: [Hk, G * c, Sk] fp32, masked entries -inf.
at::Tensor chunk_scores(const at::Tensor& qg, const at::Tensor& kb, const Geometry& g,
                        const at::Tensor& masked) {
  at::Tensor s = at::bmm(qg, kb.transpose(1, 2));
  s.mul_(g.scale);
  if (masked.defined()) s.masked_fill_(masked.to(s.device()), -std::numeric_limits<float>::infinity());
  return s;
}

struct AttentionFn : public torch::autograd::Function<AttentionFn> {
  // Keeps: q, k, v (as given), the output [B, S, H, D] (returned) and lse [B, H, S] fp32.
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k,
                            const at::Tensor& v, const OptTensor& key_padding, double scale,
                            bool causal, int64_t chunk_bytes) {
    const Geometry g = geometry(q, k, scale, causal, chunk_bytes);
    const at::Tensor kpm = key_padding.has_value() ? *key_padding : at::Tensor();
    at::Tensor out = at::empty({g.B, g.S, g.H, g.D}, q.options());
    at::Tensor lse = at::empty({g.B, g.H, g.S}, q.options().dtype(at::kFloat));
    const float inf = std::numeric_limits<float>::infinity();
    for (int64_t b = 0; b < g.B; ++b) {
      const at::Tensor kb = k[b].to(at::kFloat).transpose(0, 1);  // [Hk, Sk, D]
      const at::Tensor vb = v[b].to(at::kFloat).transpose(0, 1);  // [Hk, Sk, D]
      for (int64_t s0 = 0; s0 < g.S; s0 += g.chunk) {
        const int64_t c = std::min(g.chunk, g.S - s0);
        const at::Tensor qg = group_rows(q[b].narrow(0, s0, c), g);
        at::Tensor p = chunk_scores(qg, kb, g, chunk_mask(g, b, s0, c, kpm));
        at::Tensor m = std::get<0>(p.max(-1, /*keepdim=*/true));  // [Hk, G*c, 1]
        m.masked_fill_(m.eq(-inf), 0.0);  // fully masked rows: p = exp(-inf) = 0
        p.sub_(m).exp_();
        const at::Tensor l = p.sum(-1, /*keepdim=*/true);
        at::Tensor o = at::bmm(p, vb).div_(l.clamp_min(std::numeric_limits<float>::min()));
        o.masked_fill_(l.eq(0.0), 0.0);  // a row that sees no key outputs 0
        ungroup_rows_into(o, out[b].narrow(0, s0, c), g);
        const at::Tensor row_lse = (m + l.log()).view({g.Hk * g.G, c});  // -inf if no key
        lse[b].narrow(1, s0, c).copy_(row_lse);
      }
    }
    ctx->save_for_backward({q, k, v, out, lse, kpm});
    ctx->saved_data["scale"] = g.scale;
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["chunk_bytes"] = chunk_bytes;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &q = s[0], &k = s[1], &v = s[2], &out = s[3], &lse = s[4], &kpm = s[5];
    const Geometry g = geometry(q, k, ctx->saved_data["scale"].toDouble(),
                                ctx->saved_data["causal"].toBool(),
                                ctx->saved_data["chunk_bytes"].toInt());
    const at::Tensor dout = grads[0];
    at::Tensor dq = at::empty(q.sizes(), q.options());
    at::Tensor dk = at::empty(k.sizes(), k.options());
    at::Tensor dv = at::empty(v.sizes(), v.options());
    for (int64_t b = 0; b < g.B; ++b) {
      const at::Tensor kb = k[b].to(at::kFloat).transpose(0, 1);  // [Hk, Sk, D]
      const at::Tensor vb = v[b].to(at::kFloat).transpose(0, 1);
      at::Tensor dkb = at::zeros({g.Hk, g.Sk, g.D}, q.options().dtype(at::kFloat));
      at::Tensor dvb = at::zeros({g.Hk, g.Sk, g.D}, q.options().dtype(at::kFloat));
      for (int64_t s0 = 0; s0 < g.S; s0 += g.chunk) {
        const int64_t c = std::min(g.chunk, g.S - s0);
        const at::Tensor qg = group_rows(q[b].narrow(0, s0, c), g);
        const at::Tensor dog = group_rows(dout[b].narrow(0, s0, c), g);
        const at::Tensor og = group_rows(out[b].narrow(0, s0, c), g);
        const at::Tensor delta = (dog * og).sum(-1, /*keepdim=*/true);  // [Hk, G*c, 1]
        at::Tensor row_lse = lse[b].narrow(1, s0, c).reshape({g.Hk, g.G * c, 1});
        // Rows that saw no key have lse = -inf and probability 0 everywhere.
        row_lse = row_lse.masked_fill(row_lse.eq(-std::numeric_limits<float>::infinity()),
                                      std::numeric_limits<float>::infinity());
        at::Tensor p = chunk_scores(qg, kb, g, chunk_mask(g, b, s0, c, kpm));
        p.sub_(row_lse).exp_();
        dvb.add_(at::bmm(p.transpose(1, 2), dog));
        at::Tensor ds = at::bmm(dog, vb.transpose(1, 2));  // dP
        ds.sub_(delta).mul_(p);                            // dS = P * (dP - delta)
        p.reset();
        ds.mul_(g.scale);
        ungroup_rows_into(at::bmm(ds, kb), dq[b].narrow(0, s0, c), g);
        dkb.add_(at::bmm(ds.transpose(1, 2), qg));
      }
      dk[b].copy_(dkb.transpose(0, 1));
      dv[b].copy_(dvb.transpose(0, 1));
    }
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
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
  TORCH_CHECK(o.scale >= 0.0 && std::isfinite(o.scale), op, ": scale must be >= 0 (0 = 1/sqrt(D)), got ", o.scale);
  TORCH_CHECK(o.chunk_bytes > 0, op, ": chunk_bytes must be > 0, got ", o.chunk_bytes);
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
  return AttentionFn::apply(q, k, v, kpm, opts.scale, opts.causal, opts.chunk_bytes);
}

}  // namespace memfit::ops
