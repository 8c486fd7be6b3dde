#include "blocks.h"

#include <ATen/ATen.h>
#include <torch/version.h>

#include <cmath>
#include <limits>

#include "norm_merge.h"

namespace memfit::bench {

const char* mode_name(Mode m) {
  switch (m) {
    case Mode::kExactStockAttention: return "exact+stock-attn";
    case Mode::kExact: return "exact";
    case Mode::kPaper: return "paper";
    case Mode::kBest: return "memfit-best";
  }
  return "?";
}

BlockShape vit_b16_block(int64_t batch) {
  BlockShape s;
  s.arch = Arch::kViT;
  s.batch = batch;
  s.seq = 197;
  s.d = 768;
  s.heads = s.kv_heads = 12;
  s.inter = 3072;
  s.norm_eps = 1e-12;  // Hugging Face ViT's layer_norm_eps
  return s;
}

BlockShape llama7b_block(int64_t batch, int64_t seq) {
  BlockShape s;
  s.arch = Arch::kLlama;
  s.batch = batch;
  s.seq = seq;
  s.d = 4096;
  s.heads = s.kv_heads = 32;
  s.inter = 11008;
  s.norm_eps = 1e-6;
  return s;
}

void KeptBytes::add(const std::string& what, int64_t bytes) {
  parts.emplace_back(what, bytes);
  total += bytes;
}

KeptBytes expected_kept_bytes(const BlockShape& s, Mode m) {
  // fp32 throughout. T tokens; per-row statistics are one float per token.
  const int64_t f = 4, T = s.tokens(), d = s.d, I = s.inter, r = s.rank;
  const int64_t dkv = s.kv_heads * s.head_dim();
  const int64_t lse = s.batch * s.heads * s.seq * f;
  const bool vit = s.arch == Arch::kViT;
  const bool memfit_norms = m == Mode::kPaper || m == Mode::kBest;
  KeptBytes k;
  // Norm inputs: stock norms keep their input (LayerNorm: plus mean and rstd per row;
  // the RMSNorm composite: plus rsqrt per row). MS norms keep their output, which the
  // next layer keeps anyway, plus rstd per row.
  for (const char* which : {"norm1", "norm2"}) {
    if (memfit_norms) {
      k.add(std::string(which) + " output (shared with the next linear)", T * d * f);
      k.add(std::string(which) + " rstd", T * f);
    } else {
      k.add(std::string(which) + " input", T * d * f);
      k.add(std::string(which) + " output (LoRA input)", T * d * f);
      k.add(std::string(which) + " statistics", (vit ? 2 : 1) * T * f);
      // The RMSNorm composite's x.pow(2) output is kept too: LibTorch 1.13's mean()
      // backward saves its input (measured with saved-tensor hooks); 2.x's does not
      // (measured on the GPU check, docs/GPU.md).
      if (!vit && TORCH_VERSION_MAJOR < 2) k.add(std::string(which) + " input squared", T * d * f);
    }
  }
  // LoRA composites (exact modes) keep the rank-r intermediate x A^T of every layer;
  // memfit's LoRA linear recomputes it.
  const int n_lora = vit ? 6 : 7;
  if (!memfit_norms) k.add("LoRA x A^T intermediates", n_lora * T * r * f);
  // Attention.
  if (m == Mode::kExactStockAttention) {
    // The composite repeats k and v to all H heads first (grouped-query attention), so
    // the copies its products keep are full width.
    k.add("attention q, k, v (bmm copies)", T * 3 * d * f);
    k.add("attention probabilities", s.batch * s.heads * s.seq * s.seq * f);
    k.add("attention output (o_proj input copy)", T * d * f);
    if (s.arch == Arch::kLlama) k.add("causal mask (bool)", s.seq * s.seq);
    if (s.kv_heads != s.heads) k.add("repeat_interleave indices", 2 * s.heads * 8);
  } else {
    k.add("attention q, k, v", T * (d + 2 * dkv) * f);
    k.add("attention output (shared with o_proj)", T * d * f);
    k.add("attention logsumexp", lse);
  }
  // MLP.
  if (vit) {
    switch (m) {
      case Mode::kExactStockAttention:
      case Mode::kExact:
        k.add("GELU input", T * I * f);
        k.add("fc2 input (GELU output)", T * I * f);
        break;
      case Mode::kPaper:
        k.add("ReGELU2 flags", (T * I + 3) / 4);
        k.add("fc2 input (GELU output)", T * I * f);
        break;
      case Mode::kBest:
        k.add("fc1 output (GELU input, GELU recomputed)", T * I * f);
        break;
    }
  } else {
    switch (m) {
      case Mode::kExactStockAttention:
      case Mode::kExact:
        k.add("SiLU input (gate output)", T * I * f);
        k.add("product inputs silu(g), u", 2 * T * I * f);
        k.add("down input (product)", T * I * f);
        break;
      case Mode::kPaper:
        k.add("ReSiLU2 flags", (T * I + 3) / 4);
        k.add("product inputs silu(g), u", 2 * T * I * f);
        k.add("down input (product)", T * I * f);
        break;
      case Mode::kBest:
        k.add("gate and up outputs (product recomputed)", 2 * T * I * f);
        break;
    }
  }
  return k;
}

Block::Block(const BlockShape& shape, uint64_t seed, at::Device device) : shape_(shape) {
  at::manual_seed(static_cast<int64_t>(seed));
  scale_ = shape.lora_alpha / static_cast<double>(shape.rank);
  const int64_t d = shape.d, I = shape.inter, dkv = shape.kv_heads * shape.head_dim();
  const bool vit = shape.arch == Arch::kViT;
  n1_.gamma = 1.0 + 0.1 * at::randn({d});
  n2_.gamma = 1.0 + 0.1 * at::randn({d});
  if (vit) {
    n1_.beta = 0.02 * at::randn({d});
    n2_.beta = 0.02 * at::randn({d});
  }
  q_ = make_linear(d, d, vit, &n1_);
  k_ = make_linear(d, dkv, vit, &n1_);
  v_ = make_linear(d, dkv, vit, &n1_);
  o_ = make_linear(d, d, vit, nullptr);
  up_ = make_linear(d, I, vit, &n2_);
  if (!vit) gate_ = make_linear(d, I, false, &n2_);
  down_ = make_linear(I, d, vit, nullptr);
  if (!vit) {
    const int64_t hd = shape.head_dim();
    const at::Tensor inv = at::pow(10000.0, -at::arange(0, hd, 2, at::kDouble) / static_cast<double>(hd));
    const at::Tensor ang = at::outer(at::arange(shape.seq, at::kDouble), inv);  // [S, hd/2]
    const at::Tensor full = at::cat({ang, ang}, -1);
    cos_ = full.cos().to(at::kFloat).view({shape.seq, 1, hd});
    sin_ = full.sin().to(at::kFloat).view({shape.seq, 1, hd});
  }
  if (!device.is_cpu()) {
    auto move = [&](at::Tensor& t) {
      if (!t.defined()) return;
      const bool leaf = t.requires_grad();
      t = t.detach().to(device);
      if (leaf) t.requires_grad_(true);
    };
    for (Norm* n : {&n1_, &n2_}) {
      move(n->gamma);
      move(n->beta);
    }
    for (Linear* l : {&q_, &k_, &v_, &o_, &up_, &gate_, &down_}) {
      for (at::Tensor* t : {&l->w, &l->b, &l->wm, &l->bm, &l->a, &l->bb, &l->in_scale, &l->in_shift}) move(*t);
    }
    move(cos_);
    move(sin_);
  }
}

Block::Linear Block::make_linear(int64_t in, int64_t out, bool bias, const Norm* before) {
  Linear l;
  l.w = at::randn({out, in}) / std::sqrt(static_cast<double>(in));
  if (bias) l.b = 0.02 * at::randn({out});
  l.a = (at::randn({shape_.rank, in}) / std::sqrt(static_cast<double>(in))).requires_grad_(true);
  // B is zero-initialised in LoRA; small values here so every gradient path is exercised.
  l.bb = (0.01 * at::randn({out, shape_.rank})).requires_grad_(true);
  if (before != nullptr) {
    const ops::MergedLinear m = ops::merge_norm_affine(l.w, l.b, before->gamma, before->beta);
    l.wm = m.weight;
    l.bm = m.bias;
    l.in_scale = before->gamma;
    l.in_shift = before->beta;
  } else {
    l.wm = l.w;
    l.bm = l.b;
  }
  return l;
}

std::vector<at::Tensor> Block::trainable() const {
  std::vector<at::Tensor> t;
  for (const Linear* l : {&q_, &k_, &v_, &o_, &up_, &gate_, &down_}) {
    if (l->a.defined()) {
      t.push_back(l->a);
      t.push_back(l->bb);
    }
  }
  return t;
}

void Block::zero_grad() const {
  for (const at::Tensor& t : trainable()) {
    if (t.grad().defined()) const_cast<at::Tensor&>(t).mutable_grad() = at::Tensor();
  }
}

at::Tensor Block::stock_linear(const at::Tensor& x, const Linear& l) const {
  // What PEFT computes: base(x) + scale * B(A(x)).
  return at::linear(x, l.w, l.b) + scale_ * at::linear(at::linear(x, l.a), l.bb);
}

ops::LinearWeights Block::weights(const Linear& l, bool merged) const {
  ops::LinearWeights w = ops::LinearWeights::lora(merged ? l.wm : l.w, merged ? l.bm : l.b, l.a,
                                                  l.bb, scale_);
  if (merged) {
    w.lora_in_scale = l.in_scale;
    w.lora_in_shift = l.in_shift;
  }
  return w;
}

at::Tensor Block::memfit_linear(const at::Tensor& x, const Linear& l, bool merged) const {
  return ops::linear(x, weights(l, merged), /*training=*/true);
}

at::Tensor Block::norm(const at::Tensor& x, const Norm& n, Mode mode) const {
  const bool vit = shape_.arch == Arch::kViT;
  if (mode == Mode::kPaper || mode == Mode::kBest) {
    return vit ? ops::ms_layer_norm(x, shape_.norm_eps) : ops::ms_rms_norm(x, shape_.norm_eps);
  }
  if (vit) return at::layer_norm(x, {shape_.d}, n.gamma, n.beta, shape_.norm_eps);
  // The usual RMSNorm composite (LLaMA's reference code).
  return x * at::rsqrt(x.pow(2).mean(-1, /*keepdim=*/true) + shape_.norm_eps) * n.gamma;
}

at::Tensor Block::rope(const at::Tensor& t) const {
  // t: [B, S, H, hd]; rotate_half as in the LLaMA reference code.
  const int64_t half = shape_.head_dim() / 2;
  const at::Tensor rot = at::cat({-t.narrow(-1, half, half), t.narrow(-1, 0, half)}, -1);
  return t * cos_ + rot * sin_;
}

at::Tensor stock_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           bool causal) {
  const int64_t B = q.size(0), S = q.size(1), H = q.size(2), hd = q.size(3), Hk = k.size(2);
  const at::Tensor qt = q.transpose(1, 2);
  const at::Tensor kt = (H == Hk ? k : k.repeat_interleave(H / Hk, 2)).transpose(1, 2);
  const at::Tensor vt = (H == Hk ? v : v.repeat_interleave(H / Hk, 2)).transpose(1, 2);
  at::Tensor s = at::matmul(qt, kt.transpose(-2, -1)) * (1.0 / std::sqrt(static_cast<double>(hd)));
  if (causal) {
    const at::Tensor hidden = at::ones({S, k.size(1)}, q.options().dtype(at::kBool)).triu(1);
    s = s.masked_fill(hidden, -std::numeric_limits<double>::infinity());
  }
  const at::Tensor p = at::softmax(s, -1);
  return at::matmul(p, vt).transpose(1, 2).reshape({B, S, H * hd});
}

at::Tensor Block::attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         Mode mode) const {
  const bool causal = shape_.arch == Arch::kLlama;
  if (mode == Mode::kExactStockAttention) return stock_attention(q, k, v, causal);
  ops::AttentionOptions o;
  o.causal = causal;
  return ops::attention(q, k, v, o).view({shape_.batch, shape_.seq, shape_.d});
}

at::Tensor Block::forward(const at::Tensor& x, Mode mode) const {
  const int64_t B = shape_.batch, S = shape_.seq, H = shape_.heads, Hk = shape_.kv_heads;
  const int64_t hd = shape_.head_dim();
  const bool vit = shape_.arch == Arch::kViT;
  const bool memfit_mode = mode == Mode::kPaper || mode == Mode::kBest;
  auto lin = [&](const at::Tensor& t, const Linear& l) {
    return memfit_mode ? memfit_linear(t, l, /*merged=*/true) : stock_linear(t, l);
  };

  at::Tensor h = norm(x, n1_, mode);
  at::Tensor q = lin(h, q_).view({B, S, H, hd});
  at::Tensor k = lin(h, k_).view({B, S, Hk, hd});
  const at::Tensor v = lin(h, v_).view({B, S, Hk, hd});
  h.reset();
  if (!vit) {
    q = rope(q);
    k = rope(k);
  }
  const at::Tensor a = attend(q, k, v, mode);
  q.reset();
  k.reset();
  const at::Tensor x1 = x + lin(a, o_);

  const at::Tensor h2 = norm(x1, n2_, mode);
  at::Tensor mlp;
  if (vit) {
    const at::Tensor z = lin(h2, up_);
    switch (mode) {
      case Mode::kExactStockAttention:
      case Mode::kExact: mlp = stock_linear(at::gelu(z), down_); break;
      case Mode::kPaper: mlp = memfit_linear(ops::regelu2(z), down_, true); break;
      case Mode::kBest: mlp = ops::act_linear(ops::MlpAct::kGELU, z, weights(down_, true), true); break;
    }
  } else {
    const at::Tensor g = lin(h2, gate_);
    const at::Tensor u = lin(h2, up_);
    switch (mode) {
      case Mode::kExactStockAttention:
      case Mode::kExact: mlp = stock_linear(at::silu(g) * u, down_); break;
      case Mode::kPaper: mlp = memfit_linear(ops::resilu2(g) * u, down_, true); break;
      case Mode::kBest: mlp = ops::swiglu_linear(g, u, weights(down_, true), true); break;
    }
  }
  return x1 + mlp;
}

}  // namespace memfit::bench
