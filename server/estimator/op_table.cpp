#include "op_table.h"

#include <algorithm>

namespace memfit::estimator::sim {
namespace {

constexpr int64_t kF32 = 4;

Tensor like(Sim& s, const Tensor& t) { return s.empty(t.numel, t.esize); }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The LoRA branch's input before dropout (lora_input in linear_core.cpp): x itself, or
// x * gamma (+ beta) when the norm's affine is merged into W.
// oneDNN's bf16 GEMM on the CPU packs its operands into buffers from the CPU allocator,
// per thread, sized by the block sizes it picks. Not replayed exactly: an upper bound
// fitted to LibTorch 1.13 on AVX-512 BF16 (tests/estimator/sweep.py measures it), charged
// while the product runs and reported as the estimate's bound slack.
//   plain (x W^T, dy W):   256 min(R, 4096) + 2 KiB, R the reduced dimension
//   transposed (dy^T x):   min(r32(R), 2048) (2 min(N, 512) + 128) + 2 KiB, N result rows
Tensor gemm_scratch(Sim& s, int64_t reduce, int64_t rows_out, bool transposed_a, int64_t es) {
  if (s.cpu_bf16_gemm_threads <= 0 || es != 2) return Tensor{};
  const int64_t per = transposed_a
                          ? std::min<int64_t>((reduce + 31) / 32 * 32, 2048) * (2 * std::min<int64_t>(rows_out, 512) + 128) + 2048
                          : 256 * std::min<int64_t>(reduce, 4096) + 2048;
  const int64_t bytes = per * s.cpu_bf16_gemm_threads;
  s.gemm_slack = std::max(s.gemm_slack, bytes);
  return s.empty(bytes, 1);
}

Tensor lora_input(Sim& s, const Tensor& x2, const LinearW& w) {
  Tensor z = x2;
  if (w.in_scale) z = like(s, x2);
  if (w.in_shift) z = like(s, x2);  // the previous temporary goes on reassignment
  return z;
}

// linear_forward: y = x W^T + b (+ s B A drop(z)). `mask` receives the dropout bits.
Tensor linear_forward(Sim& s, const Tensor& x, int64_t rows, const LinearW& w, bool training, Tensor* mask) {
  Tensor x2 = x.viewable ? x : s.empty(x.numel, x.esize);  // reshape of a strided view copies
  Tensor y = s.empty(rows * w.out, x.esize);
  { Tensor k = gemm_scratch(s, w.in, rows, false, x.esize); }
  if (w.has_lora()) {
    Tensor z = lora_input(s, x2, w);
    if (training && w.lora_dropout > 0.0) {
      Tensor zd = s.empty(rows * w.in, x.esize);
      *mask = s.empty(ceil_div(rows * w.in, 8), 1);
      z = zd;
    }
    Tensor xa = s.empty(rows * w.rank, x.esize);
    { Tensor k = gemm_scratch(s, w.in, rows, false, x.esize); }
  }
  return y;
}

struct LinearNeeds {
  bool dx = false, dweight = false, dbias = false, dlora = false;
};

LinearNeeds needs_of(const LinearW& w, bool dx) {
  LinearNeeds n;
  n.dx = dx;
  n.dweight = w.weight.requires_grad();
  n.dbias = w.bias.defined() && w.bias.requires_grad();
  n.dlora = w.has_lora() && (w.lora_a.requires_grad() || w.lora_b.requires_grad());
  return n;
}

// linear_backward: returns {dx, dW, db, dA, dB}. x is dropped (if this holds the only
// reference) before the input gradient is allocated, as the real function does.
Grads linear_backward(Sim& s, Tensor x, const Tensor& dy, int64_t rows, const LinearW& w, const Tensor& mask,
                      const LinearNeeds& needs) {
  Grads g(5);
  const int64_t es = dy.esize;
  {
    Tensor x2;
    if (x.defined()) x2 = x.viewable ? x : s.empty(x.numel, x.esize);
    if (needs.dweight) {
      g[1] = s.empty(w.out * w.in, w.weight.esize);
      Tensor k = gemm_scratch(s, rows, w.out, true, es);
    }
    if (needs.dbias) g[2] = s.empty(w.out, w.bias.esize);
    Tensor dxa;
    if (w.has_lora() && (needs.dx || needs.dlora)) {
      dxa = s.empty(rows * w.rank, es);
      { Tensor k = gemm_scratch(s, w.out, rows, false, es); }
      if (needs.dlora) {
        Tensor z = lora_input(s, x2, w);
        if (mask.defined()) z = s.empty(rows * w.in, es);
        {
          Tensor za = s.empty(rows * w.rank, es);
          { Tensor k = gemm_scratch(s, w.in, rows, false, es); }
          g[4] = s.empty(w.out * w.rank, w.lora_b.esize);
          Tensor k = gemm_scratch(s, rows, w.out, true, es);
        }
        g[3] = s.empty(w.rank * w.in, w.lora_a.esize);
        Tensor k = gemm_scratch(s, rows, w.rank, true, es);
      }
    }
    x2 = Tensor{};
    x = Tensor{};
    if (needs.dx) {
      Tensor dx2 = s.empty(rows * w.in, es);
      { Tensor k = gemm_scratch(s, w.out, rows, false, es); }
      if (dxa.defined() && (mask.defined() || w.in_scale)) {
        Tensor dz = s.empty(rows * w.in, es);
        { Tensor k = gemm_scratch(s, w.rank, rows, false, es); }
        if (mask.defined()) dz = s.empty(rows * w.in, es);
      }
      g[0] = dx2;
    }
  }
  return g;
}

}  // namespace

Tensor linear(Sim& s, const Tensor& x, int64_t rows, const LinearW& w, bool training, const std::string& name) {
  Tensor mask;
  Tensor y = linear_forward(s, x, rows, w, training, &mask);
  const Tensor kept = w.needs_input() ? x : Tensor{};
  const LinearW wc = w;
  s.record(name, {&x, &w.weight, &w.bias, &w.lora_a, &w.lora_b}, {&y}, {kept, mask},
           [&s, kept, mask, wc, rows, dx = x.requires_grad()](Grads& gr) {
             return linear_backward(s, kept, gr[0], rows, wc, mask, needs_of(wc, dx));
           });
  return y;
}

Tensor act_linear(Sim& s, const Tensor& z, int64_t rows, const LinearW& down, bool training, const std::string& name) {
  Tensor mask, out;
  {
    Tensor h = like(s, z);
    out = linear_forward(s, h, rows, down, training, &mask);
  }
  const LinearW wc = down;
  s.record(name, {&z, &down.weight, &down.bias, &down.lora_a, &down.lora_b}, {&out}, {z, mask},
           [&s, z, mask, wc, rows](Grads& gr) {
             Tensor h;
             if (wc.needs_input()) h = like(s, z);
             Grads g = linear_backward(s, std::move(h), gr[0], rows, wc, mask, needs_of(wc, true));
             return g;  // dz overwrites dh in place
           });
  return out;
}

Tensor swiglu_linear(Sim& s, const Tensor& g, const Tensor& u, int64_t rows, const LinearW& down, bool training,
                     const std::string& name) {
  Tensor mask, out;
  {
    Tensor h = like(s, g);
    out = linear_forward(s, h, rows, down, training, &mask);
  }
  const LinearW wc = down;
  s.record(name, {&g, &u, &down.weight, &down.bias, &down.lora_a, &down.lora_b}, {&out}, {g, u, mask},
           [&s, g, u, mask, wc, rows](Grads& gr) {
             Tensor h;
             if (wc.needs_input()) h = like(s, g);
             Grads lg = linear_backward(s, std::move(h), gr[0], rows, wc, mask, needs_of(wc, true));
             Tensor du = like(s, u);
             return Grads{lg[0], du, lg[1], lg[2], lg[3], lg[4]};
           });
  return out;
}

Tensor approx_act(Sim& s, const Tensor& x, const std::string& name) {
  Tensor y = like(s, x);
  Tensor flags = s.empty(ceil_div(x.numel, 4), 1);
  s.record(name, {&x}, {&y}, {flags}, [&s, flags, n = x.numel, es = x.esize](Grads&) {
    return Grads{s.empty(n, es)};
  });
  return y;
}

Tensor stock_act(Sim& s, const Tensor& x, Act act) {
  Tensor y = like(s, x);
  const char* names[] = {"gelu", "gelu(tanh)", "silu", "relu"};
  const Tensor kept = act == Act::kReLU ? Tensor{} : x;  // relu keeps its result
  if (act == Act::kReLU) {
    const Tensor yk = y.detach();
    s.record("relu", {&x}, {&y}, {yk}, [&s, yk](Grads&) { return Grads{like(s, yk)}; });
    return y;
  }
  s.record(names[static_cast<int>(act)], {&x}, {&y}, {kept}, [&s, kept](Grads&) {
    return Grads{s.empty(kept.numel, kept.esize)};
  });
  return y;
}

Tensor ms_norm(Sim& s, const Tensor& x, int64_t rows, const std::string& name) {
  Tensor xc = x.contiguous ? x : like(s, x);
  Tensor y = like(s, x);
  Tensor rstd = s.empty(rows, kF32);
  const Tensor yk = y.detach();
  s.record(name, {&x}, {&y}, {yk, rstd}, [&s, yk, rstd](Grads& gr) {
    return Grads{s.empty(gr[0].numel, gr[0].esize)};
  });
  return y;
}

Tensor layer_norm(Sim& s, const Runtime& rt, const Tensor& x, int64_t rows, const Tensor& gamma, const Tensor& beta) {
  const int64_t stat = rt.cuda ? kF32 : x.esize;
  Tensor xc;
  if (!x.contiguous) xc = like(s, x);  // native_layer_norm works on a contiguous copy
  Tensor y = like(s, x);
  Tensor mean = s.empty(rows, stat), rstd = s.empty(rows, stat);
  xc = Tensor{};
  s.record("layer_norm", {&x, &gamma, &beta}, {&y}, {x, mean, rstd},
           [&s, x, mean, rstd, gamma, beta, dx = x.requires_grad(), cuda = rt.cuda, threads = rt.threads](Grads&) {
             Grads g(3);
             Tensor xc2;
             if (!x.contiguous) xc2 = like(s, x);
             if (dx) g[0] = like(s, x);
             if (gamma.requires_grad()) g[1] = like(s, gamma);
             if (beta.defined() && beta.requires_grad()) g[2] = like(s, beta);
             // CPU: per-thread partial sums for dgamma and dbeta.
             if (!cuda && (gamma.requires_grad() || (beta.defined() && beta.requires_grad()))) {
               Tensor partial = s.empty(2 * threads * gamma.numel, gamma.esize);
             }
             return g;
           });
  return y;
}

Tensor rms_norm_composite(Sim& s, const Runtime& rt, const Tensor& x, int64_t rows, const Tensor& gamma) {
  // xf = x.to(float); (xf * rsqrt(xf.pow(2).mean(-1) + eps)).to(x's dtype) * gamma, one C++
  // expression: its temporaries (the square, mean, sum, product) live until its end.
  Tensor xf = x.esize == kF32 ? x : cast(s, x, kF32);
  Tensor p = like(s, xf);  // pow(xf, 2): its node keeps xf
  s.record("rms_norm(pow)", {&xf}, {&p}, {xf}, [&s, xf](Grads& gr) {
    // pow_backward: grad * (2 * xf.pow(1)), one C++ expression: its temporaries (the
    // copy and the doubled copy) live until the product exists.
    Tensor a = like(s, xf);   // xf.pow(1)
    Tensor b = like(s, xf);   // * 2
    return Grads{like(s, gr[0])};  // grad * that
  });
  Tensor m = s.empty(rows, kF32);
  const Tensor pk = rt.mean_backward_keeps_input ? p : Tensor{};
  s.record("rms_norm(mean)", {&p}, {&m}, {pk}, [&s, numel = p.numel](Grads&) {
    return Grads{s.empty(numel, kF32)};  // grad.expand / n
  });
  Tensor e = s.empty(rows, kF32);
  s.record("rms_norm(add)", {&m}, {&e}, {}, [](Grads& gr) { return Grads{gr[0]}; });
  Tensor r = s.empty(rows, kF32);
  const Tensor rk = r.detach();
  s.record("rms_norm(rsqrt)", {&e}, {&r}, {rk}, [&s, rows](Grads&) {
    Tensor t1 = s.empty(rows, kF32), t2 = s.empty(rows, kF32);
    t1 = Tensor{};
    return Grads{s.empty(rows, kF32)};
  });
  Tensor prod = like(s, xf);
  s.record("rms_norm(mul)", {&xf, &r}, {&prod}, {xf, rk}, [&s, xf, rows, dxf = xf.requires_grad()](Grads&) {
    Grads g(2);
    if (dxf) g[0] = like(s, xf);
    {
      Tensor t = like(s, xf);  // grad * xf, then summed to [rows]
      g[1] = s.empty(rows, kF32);
    }
    return g;
  });
  Tensor c = x.esize == kF32 ? prod : cast(s, prod, x.esize);
  Tensor out = like(s, c);
  const Tensor ck = gamma.requires_grad() ? c : Tensor{};
  s.record("rms_norm(scale)", {&c, &gamma}, {&out}, {ck}, [&s, ck, gamma, dc = c.requires_grad(), n = c.numel,
                                                            es = c.esize](Grads&) {
    Grads g(2);
    if (dc) g[0] = s.empty(n, es);
    if (gamma.requires_grad()) {
      Tensor t = s.empty(n, es);
      g[1] = like(s, gamma);
    }
    return g;
  });
  return out;  // the temporaries go here, after the output exists
}

Tensor affine(Sim& s, const Tensor& y, const Tensor& gamma, const Tensor& beta) {
  Tensor z = like(s, y);
  const Tensor yk = gamma.requires_grad() ? y : Tensor{};
  s.record("affine(mul)", {&y, &gamma}, {&z}, {yk}, [&s, n = y.numel, es = y.esize, dy = y.requires_grad(), gamma](Grads&) {
    Grads g(2);
    if (dy) g[0] = s.empty(n, es);
    if (gamma.requires_grad()) {
      Tensor t = s.empty(n, es);
      g[1] = like(s, gamma);
    }
    return g;
  });
  if (!beta.defined()) return z;
  return add(s, z, beta);
}

Tensor add(Sim& s, const Tensor& a, const Tensor& b) {
  Tensor out = s.empty(std::max(a.numel, b.numel), a.esize);
  const bool broadcast = b.numel != a.numel;
  s.record("add", {&a, &b}, {&out}, {}, [&s, broadcast, bn = b.numel, es = b.esize](Grads& gr) {
    Grads g(2);
    g[0] = gr[0];
    g[1] = broadcast ? s.empty(bn, es) : gr[0];  // sum over the broadcast dimensions
    return g;
  });
  return out;
}

Tensor mul(Sim& s, const Tensor& a, const Tensor& b) {
  Tensor out = like(s, a);
  const Tensor ak = b.requires_grad() ? a : Tensor{};
  const Tensor bk = a.requires_grad() ? b : Tensor{};
  s.record("mul", {&a, &b}, {&out}, {ak, bk}, [&s, ak, bk, n = a.numel, es = a.esize, da = a.requires_grad(),
                                               db = b.requires_grad()](Grads&) {
    Grads g(2);
    if (da) g[0] = s.empty(n, es);
    if (db) g[1] = s.empty(n, es);
    return g;
  });
  return out;
}

Tensor tanh(Sim& s, const Tensor& x) {
  Tensor y = like(s, x);
  const Tensor yk = y.detach();
  s.record("tanh", {&x}, {&y}, {yk}, [&s, yk](Grads&) { return Grads{like(s, yk)}; });
  return y;
}

Tensor embedding(Sim& s, const Tensor& weight, const Tensor& ids, int64_t rows, int64_t d) {
  Tensor out = s.empty(rows * d, weight.esize);
  s.record("embedding", {&weight}, {&out}, {ids}, [&s, ids, weight](Grads&) {
    return Grads{like(s, weight)};  // dense gradient: zeros [V, d], rows added in
  });
  return out;
}

Tensor part(Sim& s, const Tensor& base, int64_t numel, bool contiguous, bool viewable, const std::string& op) {
  Tensor out = base.detach();
  out.numel = numel;
  out.contiguous = contiguous;
  out.viewable = viewable;
  Tensor tmp = out;
  s.record(op, {&base}, {&tmp}, {}, [&s, bn = base.numel, es = base.esize](Grads&) {
    return Grads{s.empty(bn, es)};  // zeros of the base's shape, the part copied in
  });
  out.edge = tmp.edge;
  return out;
}

Tensor contiguous_copy(Sim& s, const Tensor& x) {
  if (x.viewable) return x;
  Tensor out = like(s, x);
  s.record("clone", {&x}, {&out}, {}, [](Grads& gr) { return Grads{gr[0]}; });
  return out;
}

Tensor cast(Sim& s, const Tensor& x, int64_t esize) {
  if (esize == x.esize) return x;
  Tensor out = s.empty(x.numel, esize);
  s.record("to", {&x}, {&out}, {}, [&s, n = x.numel, es = x.esize](Grads&) { return Grads{s.empty(n, es)}; });
  return out;
}

namespace {

struct AttnGeo {
  int64_t G = 1, chunk = 1;
};

bool per_head(const Runtime& rt, const AttnShape& a) { return !rt.cuda && a.B * a.Hk >= rt.threads; }

// Queries per chunk and the largest key length of any chunk.
AttnGeo geometry(const Runtime& rt, const AttnShape& a, bool per_head_path) {
  AttnGeo g;
  g.G = a.H / std::max<int64_t>(1, a.Hk);
  const int64_t row = per_head_path ? std::max<int64_t>(1, g.G * a.S * 4 * std::max(rt.threads, 1))
                                    : std::max<int64_t>(1, a.B * a.H * a.S * 4);
  g.chunk = std::clamp<int64_t>(rt.attention_chunk_bytes / row, 1, std::max<int64_t>(a.S, 1));
  if (a.causal) g.chunk = std::min<int64_t>(g.chunk, 128);
  return g;
}

}  // namespace

Tensor attention(Sim& s, const Runtime& rt, const Tensor& q, const Tensor& k, const Tensor& v,
                 const Tensor& key_mask, const AttnShape& a) {
  const bool ph = per_head(rt, a);
  const AttnGeo g = geometry(rt, a, ph);
  const int64_t es = q.esize, c = g.chunk, len = a.S;  // the last chunk sees every key
  Tensor out = s.empty(a.B * a.S * a.H * a.D, es);
  Tensor lse = s.empty(a.B * a.H * a.S, kF32);
  {
    Tensor mask;
    if (a.key_mask) mask = s.empty(a.B * a.S, 1);
    if (ph) {
      const int64_t t = std::min<int64_t>(rt.threads, a.B * a.Hk);
      // Per thread: kv copies when not fp32, then qg, p, row_lse and the p v product.
      const int64_t per = (es == kF32 ? 0 : 2 * a.S * a.D * kF32) +
                          (g.G * c * a.D + g.G * c * len + g.G * c + g.G * c * a.D) * kF32;
      Tensor scratch = s.empty(t * per, 1);
      s.bound_threads(t, per);
    } else {
      Tensor kh = s.empty(a.B * a.Hk * a.S * a.D, kF32), vh = s.empty(a.B * a.Hk * a.S * a.D, kF32);
      Tensor qg = s.empty(a.B * a.Hk * g.G * c * a.D, kF32);
      Tensor p = s.empty(a.B * a.Hk * g.G * c * len, kF32);
      Tensor row = s.empty(a.B * a.Hk * g.G * c, kF32);
      Tensor pv = s.empty(a.B * a.Hk * g.G * c * a.D, kF32);
    }
  }
  const Tensor ok = out.detach(), lk = lse;
  s.record("attention", {&q, &k, &v}, {&out}, {q, k, v, ok, lk, key_mask},
           [&s, &rt, q, k, v, ok, lk, key_mask, a, ph, g, es, c, len](Grads& gr) {
             Grads r(3);
             Tensor dout = gr[0].contiguous ? gr[0] : like(s, gr[0]);
             Tensor dq = s.empty(a.B * a.S * a.H * a.D, es);
             Tensor mask;
             if (a.key_mask) mask = s.empty(a.B * a.S, 1);
             const int64_t kv = a.B * a.S * a.Hk * a.D;
             if (ph) {
               Tensor dk = s.empty(kv, es), dv = s.empty(kv, es);
               const int64_t t = std::min<int64_t>(rt.threads, a.B * a.Hk);
               const int64_t per = (es == kF32 ? 0 : 2 * a.S * a.D * kF32) + 2 * a.S * a.D * kF32 +
                                   (2 * g.G * c * a.D + g.G * c + 2 * g.G * c * len) * kF32 +
                                   (c < a.S ? g.G * c * kF32 : 0);  // row_lse: a copy unless one chunk
               {
                 Tensor scratch = s.empty(t * per, 1);
                 s.bound_threads(t, per);
               }
               r[1] = dk;
               r[2] = dv;
             } else {
               Tensor kh = s.empty(a.B * a.Hk * a.S * a.D, kF32), vh = s.empty(a.B * a.Hk * a.S * a.D, kF32);
               const bool one_chunk = c >= a.S;
               Tensor dkh, dvh;
               if (!one_chunk) {
                 dkh = s.empty(a.B * a.Hk * a.S * a.D, kF32);
                 dvh = s.empty(a.B * a.Hk * a.S * a.D, kF32);
               }
               Tensor delta;
               if (rt.cuda) {
                 Tensor prod = s.empty(a.B * a.S * a.H * a.D, kF32);
                 Tensor sum = s.empty(a.B * a.S * a.H, kF32);
                 prod = Tensor{};
                 delta = s.empty(a.B * a.S * a.H, kF32);
               }
               {
                 const int64_t rows = a.B * a.Hk * g.G * c;
                 Tensor qg = s.empty(rows * a.D, kF32), dog = s.empty(rows * a.D, kF32);
                 // Per-row views of [B, H, S] tensors are copies unless one chunk covers S.
                 Tensor row_delta = (!rt.cuda || c < a.S) ? s.empty(rows, kF32) : Tensor{};
                 Tensor row_lse = c < a.S ? s.empty(rows, kF32) : Tensor{};
                 Tensor p = s.empty(rows * len, kF32);
                 {
                   Tensor pv = s.empty(a.B * a.Hk * len * a.D, kF32);
                   if (one_chunk) dvh = pv;
                 }
                 Tensor ds = s.empty(rows * len, kF32);
                 p = Tensor{};
                 { Tensor dsk = s.empty(rows * a.D, kF32); }
                 {
                   Tensor dk2 = s.empty(a.B * a.Hk * len * a.D, kF32);
                   if (one_chunk) dkh = dk2;
                 }
               }
               r[1] = s.empty(kv, es);
               r[2] = s.empty(kv, es);
             }
             r[0] = dq;
             return r;
           });
  return out;
}

Tensor stock_attention(Sim& s, const Tensor& q, const Tensor& k, const Tensor& v, const AttnShape& a,
                       bool q_contiguous) {
  const int64_t es = q.esize, G = a.H / std::max<int64_t>(1, a.Hk);
  const int64_t n = a.B * a.S * a.H * a.D, sc = a.B * a.H * a.S * a.S;
  // repeat_interleave for grouped-query attention.
  Tensor kk = G == 1 ? k : s.empty(n, es);
  Tensor vv = G == 1 ? v : s.empty(n, es);
  if (G > 1) {
    s.record("repeat_interleave", {&k}, {&kk}, {}, [&s, kn = k.numel, es](Grads&) { return Grads{s.empty(kn, es)}; });
    s.record("repeat_interleave", {&v}, {&vv}, {}, [&s, vn = v.numel, es](Grads&) { return Grads{s.empty(vn, es)}; });
  }
  // matmul(q^T, k^T^T): both folded into batched copies, which bmm keeps.
  (void)q_contiguous;
  // Folding [B, H, S, D] (transposed from [B, S, H, D]) into bmm's [B*H, S, D] is a view
  // when B or H is 1, a copy otherwise.
  const bool fold_view = a.B == 1 || a.H == 1;
  Tensor qb = fold_view ? q.detach() : s.empty(n, es), kb = fold_view ? kk.detach() : s.empty(n, es);
  s.record("matmul(copy)", {&q}, {&qb}, {}, [](Grads& gr) { return Grads{gr[0]}; });
  s.record("matmul(copy)", {&kk}, {&kb}, {}, [](Grads& gr) { return Grads{gr[0]}; });
  Tensor sc1 = s.empty(sc, es);
  s.record("matmul(q, k)", {&qb, &kb}, {&sc1}, {qb, kb}, [&s, n, es](Grads&) {
    return Grads{s.empty(n, es), s.empty(n, es)};
  });
  qb = Tensor{};
  kb = Tensor{};
  Tensor sc2 = s.empty(sc, es);  // * 1/sqrt(D)
  s.record("scale", {&sc1}, {&sc2}, {}, [&s, sc, es](Grads&) { return Grads{s.empty(sc, es)}; });
  sc1 = Tensor{};
  Tensor hidden;
  if (a.causal) {
    {
      Tensor ones = s.empty(a.S * a.S, 1);  // ones({S, S}).triu(1): a new tensor
      hidden = s.empty(a.S * a.S, 1);
    }
    Tensor sc3 = s.empty(sc, es);
    s.record("masked_fill", {&sc2}, {&sc3}, {hidden}, [&s, sc, es](Grads&) { return Grads{s.empty(sc, es)}; });
    sc2 = sc3;
  }
  if (a.key_mask) {
    Tensor km = s.empty(a.B * a.S, 1);  // logical_not
    Tensor sc3 = s.empty(sc, es);
    s.record("masked_fill", {&sc2}, {&sc3}, {km}, [&s, sc, es](Grads&) { return Grads{s.empty(sc, es)}; });
    sc2 = sc3;
  }
  Tensor p;
  {
    // softmax(s, dtype = float): the input converted first, freed once the result exists.
    Tensor converted = es != kF32 ? s.empty(sc, kF32) : Tensor{};
    p = s.empty(sc, kF32);
  }
  const Tensor pk = p.detach();
  s.record("softmax", {&sc2}, {&p}, {pk}, [&s, sc](Grads&) { return Grads{s.empty(sc, kF32)}; });
  // sc2 stays: the worker's `s` holds the last scores until the function returns.
  Tensor pc = cast(s, p, es);
  p = Tensor{};
  Tensor vb = fold_view ? vv.detach() : s.empty(n, es);
  s.record("matmul(copy)", {&vv}, {&vb}, {}, [](Grads& gr) { return Grads{gr[0]}; });
  Tensor o = s.empty(n, es);
  s.record("matmul(p, v)", {&pc, &vb}, {&o}, {pc, vb}, [&s, sc, n, es](Grads& gr) {
    Tensor g = gr[0].contiguous ? gr[0] : s.empty(n, es);
    return Grads{s.empty(sc, es), s.empty(n, es)};
  });
  vb = Tensor{};
  // .transpose(1, 2).reshape(B, S, H * D): a copy; its gradient is a strided view.
  Tensor out = s.empty(n, es);
  s.record("reshape", {&o}, {&out}, {}, [](Grads& gr) {
    Tensor g = gr[0];
    g.contiguous = false;
    return Grads{g};
  });
  return out;
}

Tensor rope(Sim& s, const Tensor& t, const Tensor& cos, const Tensor& sin) {
  const int64_t n = t.numel, es = t.esize;
  Tensor rot;
  {
    Tensor hi = part(s, t, n / 2, false, false, "narrow");
    Tensor lo = part(s, t, n / 2, false, false, "narrow");
    Tensor neg = s.empty(n / 2, es);
    s.record("neg", {&hi}, {&neg}, {}, [&s, n, es](Grads&) { return Grads{s.empty(n / 2, es)}; });
    rot = s.empty(n, es);
    s.record("cat", {&neg, &lo}, {&rot}, {}, [](Grads& gr) {
      Tensor a = gr[0], b = gr[0];
      a.numel /= 2;
      b.numel /= 2;
      a.contiguous = b.contiguous = false;
      return Grads{a, b};
    });
  }
  Tensor tc = s.empty(n, es);
  s.record("mul(cos)", {&t}, {&tc}, {cos}, [&s, n, es](Grads&) { return Grads{s.empty(n, es)}; });
  Tensor rs = s.empty(n, es);
  s.record("mul(sin)", {&rot}, {&rs}, {sin}, [&s, n, es](Grads&) { return Grads{s.empty(n, es)}; });
  rot = Tensor{};
  return add(s, tc, rs);
}

Tensor stock_linear(Sim& s, const Tensor& x, int64_t rows, int64_t in, int64_t out, const Tensor& weight) {
  Tensor x2 = contiguous_copy(s, x);
  Tensor y = s.empty(rows * out, x.esize);
  { Tensor k = gemm_scratch(s, in, rows, false, x.esize); }
  const Tensor xk = weight.requires_grad() ? x2 : Tensor{};
  s.record("linear(head)", {&x2, &weight}, {&y}, {xk}, [&s, rows, in, out, weight, dx = x2.requires_grad(),
                                                       es = x.esize](Grads&) {
    Grads g(2);
    if (dx) {
      g[0] = s.empty(rows * in, es);
      Tensor k = gemm_scratch(s, out, rows, false, es);
    }
    if (weight.requires_grad()) {
      g[1] = like(s, weight);
      Tensor k = gemm_scratch(s, rows, out, true, es);
    }
    return g;
  });
  return y;
}

Tensor cross_entropy(Sim& s, const Tensor& logits, int64_t rows, int64_t classes) {
  Tensor l = cast(s, logits, kF32);
  Tensor lp = s.empty(rows * classes, kF32);
  const Tensor lpk = lp.detach();
  s.record("log_softmax", {&l}, {&lp}, {lpk}, [&s, rows, classes](Grads&) {
    return Grads{s.empty(rows * classes, kF32)};
  });
  l = Tensor{};
  Tensor loss = s.empty(1, kF32);
  s.record("nll_loss", {&lp}, {&loss}, {lpk}, [&s, rows, classes](Grads&) {
    return Grads{s.empty(rows * classes, kF32)};  // zeros_like(log-probs)
  });
  return loss;
}

Tensor linear_cross_entropy(Sim& s, const Runtime& rt, const Tensor& h, int64_t rows, int64_t d, int64_t vocab,
                            const Tensor& weight) {
  const bool build = s.grad_mode && (h.requires_grad() || weight.requires_grad());
  // bf16 on CUDA: products in bf16, no fp32 copy of the head, the logits' product cast
  // to fp32 (worker/ops/functions/cross_entropy.cpp). The estimator's 2-byte dtype is bf16.
  const bool low = rt.cuda && h.esize == 2 && weight.esize == h.esize;
  Tensor valid = s.empty(rows, 1);
  Tensor wf = low || weight.esize == kF32 ? Tensor{} : s.empty(vocab * d, kF32);
  Tensor dh, dw;
  if (build && h.requires_grad()) dh = s.empty(rows * d, h.esize);
  if (build && weight.requires_grad()) dw = s.empty(vocab * d, kF32);
  Tensor total = s.empty(1, 8);  // the loss summed on the device, in double
  {
    const int64_t step = std::max<int64_t>(1, rt.loss_chunk_bytes / std::max<int64_t>(1, vocab * 4));
    const int64_t c = std::min(step, rows);
    Tensor hc = low || h.esize == kF32 ? Tensor{} : s.empty(c * d, kF32);
    Tensor safe = s.empty(c, 8);
    Tensor logits;
    {
      Tensor product = low ? s.empty(c * vocab, h.esize) : Tensor{};
      logits = s.empty(c * vocab, kF32);
    }
    Tensor lse = s.empty(c, kF32), picked = s.empty(c, kF32);
    if (build) {
      Tensor a = s.empty(c, kF32), b = s.empty(c, kF32);
      if (dh.defined()) {
        Tensor cast = low ? s.empty(c * vocab, h.esize) : Tensor{};
        Tensor dhc = s.empty(c * d, low ? h.esize : kF32);
      }
      if (dw.defined() && low) Tensor hcf = s.empty(c * d, kF32);
    }
  }
  Tensor loss = s.empty(1, kF32);
  s.record("linear_cross_entropy", {&h, &weight}, {&loss}, {dh, dw},
           [&s, dh, dw, weight, rows, d, es = h.esize](Grads&) {
             Grads g(2);
             if (dh.defined()) g[0] = s.empty(rows * d, es);
             if (dw.defined()) {
               g[1] = s.empty(dw.numel, kF32);
               if (weight.esize != kF32) g[1] = s.empty(dw.numel, weight.esize);
             }
             return g;
           });
  return loss;
}

Tensor patch_conv(Sim& s, const Runtime& rt, const Tensor& pixels, int64_t B, int64_t C, int64_t image, int64_t patch,
                  int64_t d, const Tensor& weight, const Tensor& bias) {
  const int64_t np = (image / patch) * (image / patch), taps = C * patch * patch;
  const int64_t es = weight.esize;
  // CPU (LibTorch 1.13's oneDNN convolution): output channels padded to blocks of 16.
  const int64_t dp = (d + 15) / 16 * 16;
  Tensor out;
  if (rt.cuda) {
    out = s.empty(B * d * np, es);
  } else {
    Tensor pad = dp != d ? s.empty(2 * d, es) : Tensor{};
    Tensor wb = s.empty(dp * taps, kF32);  // the weight reordered to the blocked layout (fp32 for bf16 too)
    if (dp == d) {
      out = s.empty(B * d * np, es);     // written in place: the layouts coincide
    } else {
      Tensor ob = s.empty(B * dp * np, es);
      wb = Tensor{};
      pad = Tensor{};
      out = s.empty(B * d * np, es);     // reordered back, without the padding
    }
  }
  const Tensor pk = weight.requires_grad() ? pixels : Tensor{};
  s.record("conv2d", {&weight, &bias}, {&out}, {pk},
           [&s, cuda = rt.cuda, threads = int64_t{rt.threads}, weight, bias, B, np, d, dp, taps, es](Grads&) {
    Grads g(2);
    if (!cuda && weight.requires_grad()) {
      // oneDNN's weight gradient: grad_output made contiguous, then blocked; the weight's
      // and the bias's gradients formed blocked, then reordered into the plain ones.
      Tensor go = s.empty(B * np * d, es), gob = s.empty(B * np * dp, es), wb = s.empty(dp * taps, es), bb;
      {
        Tensor pad = dp != d ? s.empty(2 * d, es) : Tensor{};
        bb = s.empty(d, es);
      }
      // Fewer blocks of 16 output channels than threads: oneDNN splits the images over
      // threads and reduces per-thread partial weight gradients (bounded, not replayed).
      if (threads > dp / 16) {
        const int64_t per = dp * taps * kF32 + B * np * dp * kF32 + 8192;
        { Tensor partial = s.empty(threads * per, 1); }
        s.thread_slack = std::max(s.thread_slack, threads * per);
      }
      gob = Tensor{};
      if (bias.requires_grad()) g[1] = like(s, bias);
      g[0] = like(s, weight);
      return g;
    }
    if (weight.requires_grad()) g[0] = like(s, weight);
    if (bias.requires_grad()) g[1] = like(s, bias);
    return g;
  });
  return out;
}

Tensor cat2(Sim& s, const Tensor& a, const Tensor& b) {
  Tensor out = s.empty(a.numel + b.numel, b.esize);
  s.record("cat", {&a, &b}, {&out}, {}, [an = a.numel, bn = b.numel](Grads& gr) {
    Tensor x = gr[0], y = gr[0];
    x.numel = an;
    y.numel = bn;
    x.contiguous = y.contiguous = false;
    return Grads{x, y};
  });
  return out;
}

Tensor checkpoint(Sim& s, const Runtime& rt, const Tensor& x, const Tensor& anchor,
                  const std::function<Tensor(const Tensor&)>& fn) {
  Tensor rng;
  if (!rt.cuda) {
    rng = s.empty(5056, 1);  // the CPU generator's state, in ctx->saved_data: freed with the graph
    if (s.grad_mode) s.hold_until_drop(rng);
  }
  Tensor out;
  {
    const bool mode = s.grad_mode;
    s.grad_mode = false;
    out = fn(x.detach());
    s.grad_mode = mode;
  }
  const Tensor xk = x.detach();
  s.record("checkpoint", {&x, &anchor}, {&out}, {xk, rng}, [&s, xk, fn, rng](Grads& gr) {
    Tensor now;
    if (rng.defined()) now = s.empty(5056, 1);  // the generator's state, restored after
    Leaf* leaf = s.new_leaf(xk.esize, false);
    Tensor xin = xk;
    xin.edge = Edge{nullptr, 0, leaf};
    s.grad_mode = true;
    s.push_graph();
    Tensor o = fn(xin);
    xin = Tensor{};
    s.grad_mode = false;
    s.backward_nested(o, gr[0]);
    o = Tensor{};
    Tensor dx = leaf->grad;
    leaf->grad = Tensor{};
    return Grads{dx, Tensor{}};
  });
  return out;
}

}  // namespace memfit::estimator::sim
