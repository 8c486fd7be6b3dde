// The per-head CPU path of memfit::ops::attention (see attention_impl.h). Each task is
// one (batch, kv-head) pair: its queries in chunks, its keys and values as strided views
// (no copy for fp32). Inside the parallel region ATen's own loops and OpenBLAS (OpenMP
// build) run single-threaded, so each thread works through its heads with the score
// block in cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>

#include "functions/attention_impl.h"
#include "kernels/attention_rows.h"

namespace memfit::ops::detail::attn {
namespace {

namespace k = memfit::kernels;

k::DType dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? k::DType::kFloat32
         : t.scalar_type() == at::kBFloat16 ? k::DType::kBFloat16
                                            : k::DType::kFloat16;
}

// Queries per chunk for one task: the task's score block (G * c * Sk fp32) times the
// threads that hold one at once stays under chunk_bytes.
int64_t task_chunk(const Geometry& g, int64_t chunk_bytes, int threads) {
  const int64_t row_bytes = std::max<int64_t>(1, g.G * g.Sk * 4 * std::max(threads, 1));
  int64_t c = std::clamp<int64_t>(chunk_bytes / row_bytes, 1, std::max<int64_t>(g.S, 1));
  if (g.causal) c = std::min<int64_t>(c, kCausalChunkRows);
  return c;
}

// A [1, S, G, D] view of t for pair (b, hk): the task's slice in the 4-D layout the
// gather and scatter kernels take.
at::Tensor pair_view(const at::Tensor& t, int64_t b, int64_t hk, int64_t group) {
  return t.narrow(0, b, 1).narrow(2, hk * group, group);
}

// [Sk, D] fp32 keys or values of pair (b, hk): a strided view for fp32, else a copy.
at::Tensor kv_matrix(const at::Tensor& t, int64_t b, int64_t hk) {
  const at::Tensor m = t.select(0, b).select(1, hk);
  return m.scalar_type() == at::kFloat ? m : m.to(at::kFloat);
}

k::AttentionRows task_rows(const Geometry& g, int64_t s0, int64_t c, int64_t len,
                           const at::Tensor& mask, int64_t b) {
  k::AttentionRows r;
  r.rows = g.G * c;
  r.len = len;
  r.ld = len;
  r.chunk = c;
  r.rows_per_batch = g.G * c;
  r.causal = g.causal;
  r.causal_base = s0 + (g.Sk - g.S) + 1;  // negative while queries see no key
  if (mask.defined()) {
    r.key_mask = mask.data_ptr<uint8_t>() + b * mask.size(1);
    r.key_mask_ld = mask.size(1);
  }
  return r;
}

void gather(const at::Tensor& view, int64_t s0, int64_t c, int64_t group, double mul,
            const at::Tensor& dst, const at::Tensor& dot_with = {}, const at::Tensor& dot = {}) {
  k::attention_gather_cpu(dtype_of(view), view.data_ptr(), layout_of(view, s0, c, 1, group),
                          static_cast<float>(mul), dst.data_ptr<float>(),
                          dot_with.defined() ? dot_with.data_ptr() : nullptr,
                          dot.defined() ? dot.data_ptr<float>() : nullptr);
}

void scatter(const at::Tensor& block, const at::Tensor& view, int64_t s0, int64_t c,
             int64_t group, double mul) {
  k::attention_scatter_cpu(dtype_of(view), block.data_ptr<float>(), layout_of(view, s0, c, 1, group),
                           static_cast<float>(mul), view.data_ptr());
}

}  // namespace

void forward_per_head(const Geometry& g, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& mask, const at::Tensor& out,
                      const at::Tensor& lse, int64_t chunk_bytes) {
  const int threads = at::get_num_threads();
  const int64_t chunk = task_chunk(g, chunk_bytes, threads);
  const auto f32 = q.options().dtype(at::kFloat);
  at::parallel_for(0, g.B * g.Hk, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / g.Hk, hk = t % g.Hk;
      const at::Tensor kb = kv_matrix(k, b, hk), vb = kv_matrix(v, b, hk);
      const at::Tensor qv = pair_view(q, b, hk, g.G), ov = pair_view(out, b, hk, g.G);
      const at::Tensor lse_pair = lse.select(0, b).narrow(0, hk * g.G, g.G);  // [G, S]
      for (int64_t s0 = 0; s0 < g.S; s0 += chunk) {
        const int64_t c = std::min(chunk, g.S - s0), len = key_limit(g, s0, c);
        at::Tensor qg = at::empty({g.G * c, g.D}, f32);
        gather(qv, s0, c, g.G, g.scale, qg);
        at::Tensor p = at::mm(qg, kb.narrow(0, 0, len).t());  // [G*c, len]
        at::Tensor row_lse = at::empty({g.G * c}, f32);
        k::attention_softmax_forward_cpu(task_rows(g, s0, c, len, mask, b), p.data_ptr<float>(),
                                         row_lse.data_ptr<float>());
        scatter(at::mm(p, vb.narrow(0, 0, len)), ov, s0, c, g.G, 1.0);
        lse_pair.narrow(1, s0, c).copy_(row_lse.view({g.G, c}));
      }
    }
  });
}

void backward_per_head(const Geometry& g, const at::Tensor& q, const at::Tensor& k,
                       const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                       const at::Tensor& mask, const at::Tensor& dout, const at::Tensor& dq,
                       const at::Tensor& dk, const at::Tensor& dv, int64_t chunk_bytes) {
  const int threads = at::get_num_threads();
  const int64_t chunk = task_chunk(g, chunk_bytes, threads);
  const auto f32 = q.options().dtype(at::kFloat);
  at::parallel_for(0, g.B * g.Hk, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / g.Hk, hk = t % g.Hk;
      const at::Tensor kb = kv_matrix(k, b, hk), vb = kv_matrix(v, b, hk);
      const at::Tensor qv = pair_view(q, b, hk, g.G), dqv = pair_view(dq, b, hk, g.G);
      const at::Tensor dov = pair_view(dout, b, hk, g.G), ov = pair_view(out, b, hk, g.G);
      const at::Tensor lse_pair = lse.select(0, b).narrow(0, hk * g.G, g.G);  // [G, S]
      at::Tensor dkb = at::zeros({g.Sk, g.D}, f32), dvb = at::zeros({g.Sk, g.D}, f32);
      for (int64_t s0 = 0; s0 < g.S; s0 += chunk) {
        const int64_t c = std::min(chunk, g.S - s0), len = key_limit(g, s0, c);
        const k::AttentionRows rows = task_rows(g, s0, c, len, mask, b);
        at::Tensor qg = at::empty({g.G * c, g.D}, f32), dog = at::empty({g.G * c, g.D}, f32);
        at::Tensor delta = at::empty({g.G * c}, f32);
        gather(qv, s0, c, g.G, g.scale, qg);
        gather(dov, s0, c, g.G, 1.0, dog, ov, delta);  // and delta = rowsum(dO * O)
        const at::Tensor row_lse = lse_pair.narrow(1, s0, c).contiguous();
        const at::Tensor kc = kb.narrow(0, 0, len), vc = vb.narrow(0, 0, len);
        at::Tensor p = at::mm(qg, kc.t());
        k::attention_probs_cpu(rows, p.data_ptr<float>(), row_lse.data_ptr<float>());
        dvb.narrow(0, 0, len).addmm_(p.t(), dog);
        at::Tensor ds = at::mm(dog, vc.t());  // dP
        k::attention_dscores_cpu(rows, ds.data_ptr<float>(), p.data_ptr<float>(), delta.data_ptr<float>());
        p.reset();
        scatter(at::mm(ds, kc), dqv, s0, c, g.G, g.scale);
        dkb.narrow(0, 0, len).addmm_(ds.t(), qg);  // qg carries the scale
      }
      scatter(dkb, pair_view(dk, b, hk, 1), 0, g.Sk, 1, 1.0);
      scatter(dvb, pair_view(dv, b, hk, 1), 0, g.Sk, 1, 1.0);
    }
  });
}

}  // namespace memfit::ops::detail::attn
