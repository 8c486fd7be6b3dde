// The estimator as a library: bad input names the field, sizes parse, the per-layer
// accounting at real sizes equals the block accounting of docs/ACCOUNTING.md, the fit
// plan keeps the global batch and prefers free options, calibration stays bounded.
// No LibTorch here; the estimator against the real worker is tests/estimator/accuracy.py.
#include <gtest/gtest.h>

#include <string>

#include "calibration.h"
#include "estimator.h"
#include "fit.h"
#include "reference_configs.h"

namespace {

namespace est = memfit::estimator;
using memfit::spec::Architecture;
using memfit::spec::Method;
using memfit::spec::Task;

memfit::model::ModelConfig gpt2_small() { return est::reference::gpt2(768, 12, 12); }
memfit::model::ModelConfig llama_7b() { return est::reference::llama(4096, 32, 32, 32, 11008); }
memfit::model::ModelConfig vit_base() { return est::reference::vit(768, 12, 12); }

est::Input input(const memfit::model::ModelConfig& c, Method m, int64_t micro, int64_t seq) {
  est::Input in;
  in.config = c;
  in.job.architecture = c.arch;
  in.job.task = c.arch == Architecture::kViT ? Task::kImageClassification : Task::kCausalLM;
  in.job.format = c.arch == Architecture::kViT ? memfit::spec::DataFormat::kIdx : memfit::spec::DataFormat::kText;
  in.job.method = m;
  in.job.training.micro_batch = micro;
  in.job.training.sequence_length = seq;
  in.device = est::DeviceModel::cuda();
  return in;
}

std::string error_of(const est::Input& in) {
  try {
    est::estimate(in);
  } catch (const est::EstimateError& e) {
    return e.what();
  }
  return "";
}

TEST(Estimator, BadInputNamesTheField) {
  est::Input in = input(gpt2_small(), Method::kLora, 8, 512);
  EXPECT_EQ(error_of(in), "");
  auto with = [&](auto change) {
    est::Input x = in;
    change(x);
    return error_of(x);
  };
  EXPECT_NE(with([](est::Input& x) { x.job.training.micro_batch = 0; }).find("training.micro_batch: must be positive"),
            std::string::npos);
  EXPECT_NE(with([](est::Input& x) { x.job.training.micro_batch = 1000000000000; })
                .find("training.micro_batch: 1000000000000 is beyond"),
            std::string::npos);
  EXPECT_NE(with([](est::Input& x) { x.job.training.sequence_length = -4; }).find("training.sequence_length"),
            std::string::npos);
  EXPECT_NE(with([](est::Input& x) { x.job.training.sequence_length = 2048; }).find("exceeds the model's 1024 positions"),
            std::string::npos);
  EXPECT_NE(with([](est::Input& x) { x.config.hidden = 0; }).find("hidden size"), std::string::npos);
  EXPECT_NE(with([](est::Input& x) { x.config.heads = 7; }).find("not a multiple of the 7 attention heads"),
            std::string::npos);
  EXPECT_NE(with([](est::Input& x) { x.config.vocab_size = 0; }).find("config: vocab_size"), std::string::npos);
  EXPECT_NE(with([](est::Input& x) { x.job.lora.rank = 0; }).find("method.lora.rank"), std::string::npos);
  EXPECT_NE(with([](est::Input& x) { x.job.lora.target_modules = {"q_proj"}; })
                .find("method.lora.target_modules: no linear layer named 'q_proj'"),
            std::string::npos);
  EXPECT_NE(with([](est::Input& x) { x.job.architecture = Architecture::kLlama; }).find("model.architecture"),
            std::string::npos);
  // Sizes whose products overflow 64 bits: a clear error, no wrap-around.
  EXPECT_NE(with([](est::Input& x) {
              x.job.training.micro_batch = 1 << 20;
              x.job.training.sequence_length = 1024;
              x.config.vocab_size = 1 << 24;
            }).find("no device holds this job"),
            std::string::npos);
}

TEST(Estimator, SizesParse) {
  EXPECT_EQ(est::parse_size("16GiB", "--device-memory"), int64_t{16} << 30);
  EXPECT_EQ(est::parse_size("800MiB", "--device-memory"), int64_t{800} << 20);
  EXPECT_EQ(est::parse_size("80GB", "--device-memory"), int64_t{80000000000});
  EXPECT_EQ(est::parse_size("1.5 GiB", "--device-memory"), int64_t{3} << 29);
  EXPECT_EQ(est::parse_size("123456", "--device-memory"), 123456);
  for (const char* bad : {"", "GiB", "12XB", "-5", "0", "1e9", "16 GiBs"}) {
    try {
      est::parse_size(bad, "--device-memory");
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const est::EstimateError& e) {
      EXPECT_NE(std::string(e.what()).find("--device-memory"), std::string::npos) << e.what();
    }
  }
  EXPECT_EQ(est::format_size(512), "512 B");
  EXPECT_EQ(est::format_size(int64_t{3} << 29), "1.50 GiB");
}

TEST(Estimator, StateIsExact) {
  const est::Estimate full = est::estimate(input(gpt2_small(), Method::kFull, 4, 256));
  EXPECT_EQ(full.parameters, 124439808);  // GPT-2 124M, the tied head counted once
  EXPECT_EQ(full.trainable_parameters, full.parameters);
  EXPECT_EQ(full.optimizer_bytes, 2 * 4 * full.parameters);
  EXPECT_EQ(full.gradient_bytes, 4 * full.parameters);
  const est::Estimate lora = est::estimate(input(gpt2_small(), Method::kLora, 4, 256));
  // LoRA r = 8 on c_attn, c_proj, c_fc, c_proj of 12 layers.
  const int64_t per_layer = 8 * (768 + 3 * 768) + 8 * (768 + 768) + 8 * (768 + 3072) + 8 * (3072 + 768);
  EXPECT_EQ(lora.trainable_parameters, 12 * per_layer);
  EXPECT_EQ(lora.optimizer_bytes, 2 * 4 * lora.trainable_parameters);
  EXPECT_EQ(lora.weights_bytes, 4 * (full.parameters + lora.trainable_parameters));
  EXPECT_LT(lora.peak_bytes, full.peak_bytes);
  EXPECT_EQ(lora.context_bytes, est::DeviceModel::kCudaContextBytes);
  EXPECT_EQ(lora.peak_bytes, lora.allocated_peak_bytes + lora.allocator_overhead_bytes + lora.context_bytes);
}

// Kept bytes of one middle layer, in units of T * d * 4 (docs/ACCOUNTING.md's tables).
double layer_units(est::Input in, const char* preset_or_mode) {
  const std::string m = preset_or_mode;
  in.job.lora.rank = 8;
  if (m == "paper" || m == "best") {
    in.job.memory.approx_activation = true;
    in.job.memory.memory_sharing_norm = true;
  }
  if (m == "best") in.job.memory.preset = "memfit_best";
  const est::Estimate e = est::estimate(in);
  const int64_t T = in.job.training.micro_batch *
                    (in.config.arch == Architecture::kViT ? in.config.max_positions : in.job.training.sequence_length);
  for (const auto& L : e.activations) {
    if (L.where == "layer 3") return static_cast<double>(L.bytes) / static_cast<double>(T * in.config.hidden * 4);
  }
  ADD_FAILURE() << "no layer 3 in the breakdown";
  return 0.0;
}

TEST(Estimator, LayersKeepWhatTheBlockAccountingSays) {
  // The same figures bench/blocks measures on the real blocks (docs/ACCOUNTING.md).
  const est::Input vit = input(vit_base(), Method::kLora, 8, 0);
  EXPECT_NEAR(layer_units(vit, "exact"), 16.0 + 4.0 / 768 + 12.0 / 768, 0.002);
  EXPECT_NEAR(layer_units(vit, "paper"), 10.25 + 2.0 / 768 + 12.0 / 768, 0.002);
  EXPECT_NEAR(layer_units(vit, "best"), 10.0 + 2.0 / 768 + 12.0 / 768, 0.002);
  est::Input llama = input(llama_7b(), Method::kLora, 1, 512);
  llama.device = est::DeviceModel::cpu(1);  // LibTorch 1.13's RMSNorm composite keeps x^2
  EXPECT_NEAR(layer_units(llama, "exact"), 20.75 + 2.0 / 4096 + 32.0 / 4096, 0.002);
  EXPECT_NEAR(layer_units(llama, "paper"), 14.23047 + 2.0 / 4096 + 32.0 / 4096, 0.002);
  EXPECT_NEAR(layer_units(llama, "best"), 11.375 + 2.0 / 4096 + 32.0 / 4096, 0.002);
}

TEST(Estimator, FitKeepsTheGlobalBatchAndPrefersFreeOptions) {
  est::Input in = input(gpt2_small(), Method::kLora, 16, 1024);
  in.job.training.gradient_accumulation = 2;
  const est::Estimate asked = est::estimate(in);
  // Plenty of memory: as requested, with the whole global batch in one micro-batch.
  const est::FitPlan roomy = est::fit(in, int64_t{1} << 50);
  ASSERT_TRUE(roomy.fits);
  EXPECT_EQ(roomy.level, "as-requested");
  EXPECT_EQ(roomy.micro_batch, 32);
  EXPECT_EQ(roomy.gradient_accumulation, 1);
  // Just below what the request needs: free options or a smaller micro-batch, never
  // checkpointing, and the global batch kept.
  const est::FitPlan tight = est::fit(in, asked.peak_bytes - 1);
  ASSERT_TRUE(tight.fits);
  EXPECT_NE(tight.level, "checkpointing");
  EXPECT_EQ(tight.micro_batch * tight.gradient_accumulation, 32);
  EXPECT_LE(tight.estimate.peak_bytes, asked.peak_bytes - 1);
  EXPECT_FALSE(tight.reasons.empty());
  // Nothing fits in 1 GiB on a GPU (the context alone is half of it): the answer says
  // how much would.
  const est::FitPlan none = est::fit(in, int64_t{1} << 30);
  EXPECT_FALSE(none.fits);
  EXPECT_GT(none.smallest_bytes, int64_t{1} << 30);
  EXPECT_EQ(none.estimate.peak_bytes, none.smallest_bytes);
  EXPECT_NE(none.reasons.back().find("nothing fits"), std::string::npos);
  // Checkpointing only when nothing else fits: just above the checkpointed minimum.
  const est::FitPlan last = est::fit(in, none.smallest_bytes);
  ASSERT_TRUE(last.fits);
  EXPECT_EQ(last.level, "checkpointing");
  EXPECT_EQ(last.micro_batch, 1);
  EXPECT_THROW(est::fit(in, 0), est::EstimateError);
}

TEST(Estimator, CalibrationIsBounded) {
  est::Calibration c;
  const std::string k = "gpt2|attention|cuda";
  EXPECT_DOUBLE_EQ(c.factor(k), 1.0);
  // One low outlier cannot shrink the reservation at all; three can, by 5% at most.
  c.add({k, 1000, 500});
  EXPECT_DOUBLE_EQ(c.factor(k), 1.0);
  c.add({k, 1000, 700});
  c.add({k, 1000, 800});
  EXPECT_DOUBLE_EQ(c.factor(k), 0.95);
  EXPECT_EQ(c.apply(k, 1000000), 950000);
  // A job that measured above its estimate raises the factor to cover it (+1%).
  c.add({k, 1000, 1100});
  EXPECT_NEAR(c.factor(k), 1.111, 1e-9);
  EXPECT_FALSE(c.needs_review(k));
  // Other kinds are untouched; a miss beyond 2x is capped and flagged.
  EXPECT_DOUBLE_EQ(c.factor("vit|none|cuda"), 1.0);
  c.add({"vit|none|cuda", 1000, 3000});
  EXPECT_DOUBLE_EQ(c.factor("vit|none|cuda"), 2.0);
  EXPECT_TRUE(c.needs_review("vit|none|cuda"));
  // Old observations age out of the window.
  for (size_t i = 0; i < est::Calibration::kWindow; ++i) c.add({k, 1000, 900});
  EXPECT_DOUBLE_EQ(c.factor(k), 0.95);
  EXPECT_THROW(c.add({k, 0, 5}), est::EstimateError);
  EXPECT_EQ(est::Calibration::key_of(input(gpt2_small(), Method::kLora, 1, 8)), "gpt2|attention|cuda");
}

}  // namespace
