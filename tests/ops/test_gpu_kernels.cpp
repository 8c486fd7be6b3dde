// `gpu` label: each CUDA kernel against its CPU body on the same inputs. Skipped where
// no GPU (or no CUDA build) is present.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <gtest/gtest.h>

#include "memory_meter.h"
#include "ops.h"
#include "test_util.h"

namespace {

using memfit::ops::LinearWeights;

bool have_gpu() { return MEMFIT_WITH_CUDA && at::hasCUDA(); }

#define REQUIRE_GPU()                                                     \
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device or CPU-only build"

// Runs fn on CPU and on CUDA copies of the inputs; returns outputs and input grads.
std::vector<at::Tensor> both(const std::vector<at::Tensor>& inputs,
                             const std::function<at::Tensor(const std::vector<at::Tensor>&)>& fn,
                             const at::Device& dev) {
  std::vector<at::Tensor> xs;
  for (const auto& t : inputs) xs.push_back(t.to(dev).detach().requires_grad_(t.is_floating_point()));
  at::manual_seed(123);
  const at::Tensor y = fn(xs);
  at::manual_seed(124);
  const at::Tensor dy = at::randn(y.sizes()).to(y.dtype()).to(dev);
  y.backward(dy);
  std::vector<at::Tensor> out{y.cpu()};
  for (const auto& x : xs) out.push_back(x.grad().defined() ? x.grad().cpu() : at::Tensor());
  return out;
}

void compare(const std::vector<at::Tensor>& inputs,
             const std::function<at::Tensor(const std::vector<at::Tensor>&)>& fn, double tol) {
  const auto cpu = both(inputs, fn, at::Device(at::kCPU));
  const auto gpu = both(inputs, fn, at::Device(at::kCUDA, 0));
  for (size_t i = 0; i < cpu.size(); ++i) {
    if (!cpu[i].defined()) continue;
    EXPECT_TRUE(memfit::test::close(gpu[i], cpu[i], tol, tol)) << "tensor " << i;
  }
}

TEST(Gpu, ApproxActivations) {
  REQUIRE_GPU();
  for (auto st : {at::kFloat, at::kBFloat16}) {
    const at::Tensor x = (at::randn({1000003}) * 4).to(st);
    compare({x}, [](const auto& v) { return memfit::ops::regelu2(v[0]); }, st == at::kFloat ? 1e-5 : 1e-2);
    compare({x}, [](const auto& v) { return memfit::ops::resilu2(v[0]); }, st == at::kFloat ? 1e-5 : 1e-2);
  }
}

TEST(Gpu, MsNorms) {
  REQUIRE_GPU();
  const at::Tensor x = at::randn({37, 4096}) * 2 + 1;
  compare({x}, [](const auto& v) { return memfit::ops::ms_layer_norm(v[0], 1e-5); }, 1e-4);
  compare({x}, [](const auto& v) { return memfit::ops::ms_rms_norm(v[0], 1e-6); }, 1e-4);
  const at::Tensor odd = at::randn({5, 33});
  compare({odd}, [](const auto& v) { return memfit::ops::ms_layer_norm(v[0], 1e-5); }, 1e-4);
  // Constant rows at BERT's eps (variance exactly 0 on both) and rows of |x| ~ 1e30
  // (squares scaled on CUDA, in double on CPU).
  const at::Tensor flat = at::tensor({0.7f, -1234.567f, 0.0f}).view({3, 1}).expand({3, 4096}).contiguous();
  compare({flat}, [](const auto& v) { return memfit::ops::ms_layer_norm(v[0], 1e-12); }, 1e-4);
  compare({flat}, [](const auto& v) { return memfit::ops::ms_rms_norm(v[0], 1e-12); }, 1e-4);
  const at::Tensor huge = (at::randn({4, 768}, at::kDouble) * 1e30 + 5e29).to(at::kFloat);
  compare({huge}, [](const auto& v) { return memfit::ops::ms_layer_norm(v[0], 1e-5); }, 1e-4);
  compare({huge}, [](const auto& v) { return memfit::ops::ms_rms_norm(v[0], 1e-5); }, 1e-4);
}

TEST(Gpu, DropoutDrawsTheSameMaskAsCpu) {
  REQUIRE_GPU();
  const at::Tensor x = at::rand({100001}) + 0.5;
  compare({x}, [](const auto& v) { return memfit::ops::dropout(v[0], 0.25, true); }, 1e-6);
}

TEST(Gpu, FusedMlpAndLora) {
  REQUIRE_GPU();
  const at::Tensor g = at::randn({4, 64, 344}), u = at::randn({4, 64, 344});
  const at::Tensor w = at::randn({128, 344}) * 0.05, a = at::randn({8, 344}) * 0.1, b = at::randn({128, 8}) * 0.1;
  compare({g, u, w, a, b}, [](const auto& v) {
    return memfit::ops::swiglu_linear(v[0], v[1], LinearWeights::lora(v[2].detach(), at::Tensor(), v[3], v[4], 2.0, 0.1), true);
  }, 1e-3);
  compare({g, w, a, b}, [](const auto& v) {
    return memfit::ops::act_linear(memfit::ops::MlpAct::kGELU, v[0], LinearWeights::lora(v[1].detach(), at::Tensor(), v[2], v[3], 2.0), true);
  }, 1e-3);
}

TEST(Gpu, Attention) {
  REQUIRE_GPU();
  const at::Tensor q = at::randn({2, 128, 8, 64}), k = at::randn({2, 128, 2, 64}), v = at::randn({2, 128, 2, 64});
  compare({q, k, v}, [](const auto& t) {
    memfit::ops::AttentionOptions o;
    o.causal = true;
    return memfit::ops::attention(t[0], t[1], t[2], o);
  }, 1e-3);
}

// The edge cases the CPU tests pin down (issue 11), on the CUDA path: causal attention with
// S > Sk (queries that see no key: output 0, no gradient), S < Sk, one query or one key,
// grouped-query heads, a key padding mask, and a strided q.
TEST(Gpu, AttentionEdgeCases) {
  REQUIRE_GPU();
  struct Case { int64_t S, Sk, H, Hk; bool causal, mask, strided; };
  const Case cases[] = {{48, 16, 4, 4, true, false, false}, {16, 48, 4, 2, true, false, false},
                        {1, 33, 8, 2, true, false, false},  {33, 1, 4, 1, true, false, false},
                        {40, 40, 6, 3, false, true, false}, {24, 24, 4, 4, true, false, true}};
  for (const Case& c : cases) {
    at::manual_seed(7);
    const at::Tensor q = c.strided ? at::randn({2, c.H, c.S, 32}).transpose(1, 2) : at::randn({2, c.S, c.H, 32});
    const at::Tensor k = at::randn({2, c.Sk, c.Hk, 32}), v = at::randn({2, c.Sk, c.Hk, 32});
    at::Tensor mask;
    if (c.mask) {
      mask = at::ones({2, c.Sk}, at::kBool);
      mask[1].narrow(0, c.Sk / 2, c.Sk - c.Sk / 2).fill_(false);
    }
    SCOPED_TRACE("S " + std::to_string(c.S) + " Sk " + std::to_string(c.Sk) + " H " + std::to_string(c.H) +
                 "/" + std::to_string(c.Hk));
    compare({q, k, v}, [&](const auto& t) {
      memfit::ops::AttentionOptions o;
      o.causal = c.causal;
      if (mask.defined()) o.key_padding_mask = mask.to(t[0].device());
      return memfit::ops::attention(t[0], t[1], t[2], o);
    }, 1e-3);
  }
}

// Dropout at p = 0.999: one fp32 scale, fl32(1 / (1 - p)), in forward and backward alike.
TEST(Gpu, DropoutScaleAtHighP) {
  REQUIRE_GPU();
  const at::Tensor x = at::rand({200003}) + 0.5;
  compare({x}, [](const auto& v) { return memfit::ops::dropout(v[0], 0.999, true); }, 1e-6);
}

// bf16 norms: statistics in fp32 on CUDA, double on CPU; outputs rounded to bf16 alike.
TEST(Gpu, MsNormsBf16) {
  REQUIRE_GPU();
  const at::Tensor x = (at::randn({64, 4096}) * 3 + 0.5).to(at::kBFloat16);
  compare({x}, [](const auto& v) { return memfit::ops::ms_layer_norm(v[0], 1e-5); }, 2e-2);
  compare({x}, [](const auto& v) { return memfit::ops::ms_rms_norm(v[0], 1e-6); }, 2e-2);
}

TEST(Gpu, MeterReadsTheCachingAllocator) {
  REQUIRE_GPU();
  const auto dev = at::Device(at::kCUDA, 0);
  const int64_t before = memfit::ops::MemoryMeter::stats(dev).current_bytes;
  const at::Tensor t = at::empty({1 << 20}, at::TensorOptions().device(dev));
  EXPECT_GE(memfit::ops::MemoryMeter::stats(dev).current_bytes - before, 4 << 20);
  EXPECT_GE(memfit::ops::MemoryMeter::stats(dev).reserved_bytes, 4 << 20);
}

}  // namespace
