// Job specs: JSON and YAML parse to the same job; unknown fields, wrong types and bad
// values are errors that name the field.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>

#include "spec.h"

namespace {

using memfit::spec::SpecError;

const char* kYaml = R"(
name: demo
model: {architecture: gpt2, config_path: cfg/config.json}
data:
  train_path: train.txt
  validation_path: val.txt
  format: text
  tokenizer_path: tok
method: {kind: lora, lora: {rank: 4, alpha: 8, target_modules: [c_attn]}}
memory: {activation: approx, norm: memory_sharing, attention: memory_efficient}
training: {steps: 10, micro_batch: 2, sequence_length: 32, learning_rate: 0.001, schedule: linear, seed: 3}
output_dir: out
)";

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const SpecError& e) {
    return e.what();
  }
  return "";
}

memfit::spec::Job yaml_job(const std::string& text) {
  return memfit::spec::resolve(memfit::spec::parse_yaml(text, "job.yaml"), "job.yaml", "/base");
}

TEST(Spec, YamlAndJsonGiveTheSameJob) {
  const memfit::spec::Job y = yaml_job(kYaml);
  const char* json = R"({"name": "demo", "model": {"architecture": "gpt2", "configPath": "cfg/config.json"},
    "data": {"trainPath": "train.txt", "validation_path": "val.txt", "format": "text", "tokenizer_path": "tok"},
    "method": {"kind": "lora", "lora": {"rank": 4, "alpha": 8, "target_modules": ["c_attn"]}},
    "memory": {"activation": "approx", "norm": "memory_sharing", "attention": "memory_efficient"},
    "training": {"steps": "10", "micro_batch": 2, "sequence_length": 32, "learning_rate": 0.001,
                 "schedule": "linear", "seed": 3}, "output_dir": "out"})";
  const memfit::spec::Job j = memfit::spec::resolve(memfit::spec::parse_json(json, "job.json"), "job.json", "/base");
  for (const auto* job : {&y, &j}) {
    EXPECT_EQ(job->name, "demo");
    EXPECT_EQ(job->architecture, memfit::spec::Architecture::kGPT2);
    EXPECT_EQ(job->config_path, "/base/cfg/config.json");
    EXPECT_EQ(job->lora.rank, 4);
    EXPECT_EQ(job->lora.target_modules, std::vector<std::string>{"c_attn"});
    EXPECT_TRUE(job->memory.approx_activation);
    EXPECT_TRUE(job->memory.memory_sharing_norm);
    EXPECT_EQ(job->training.steps, 10);
    EXPECT_EQ(job->training.schedule, memfit::spec::Schedule::kLinear);
    EXPECT_EQ(job->training.seed, 3u);
    EXPECT_EQ(job->output_dir, "/base/out");
    EXPECT_EQ(job->training.gradient_accumulation, 1);  // default
  }
}

TEST(Spec, UnknownFieldsAndWrongTypesNameTheField) {
  EXPECT_NE(error_of([] { yaml_job(std::string(kYaml) + "trainng: {steps: 3}\n"); }).find("trainng: unknown field"),
            std::string::npos);
  std::string bad = kYaml;
  bad.replace(bad.find("steps: 10"), 9, "steps: ten");
  EXPECT_NE(error_of([&] { yaml_job(bad); }).find("training.steps: expected an integer, got 'ten'"), std::string::npos);
  EXPECT_NE(error_of([] {
              memfit::spec::parse_json(R"({"model": {"architecture": 3, "nope": 1}})", "j.json");
            }).find("j.json"),
            std::string::npos);
  const std::string e = error_of([] { memfit::spec::parse_json(R"({"modle": {}})", "j.json"); });
  EXPECT_NE(e.find("modle"), std::string::npos) << e;
  EXPECT_NE(error_of([] { memfit::spec::parse_yaml("model: [1, 2", "y.yaml"); }).find("not valid YAML"),
            std::string::npos);
}

TEST(Spec, BadValuesNameTheFieldAndTheChoices) {
  auto with = [&](const std::string& from, const std::string& to) {
    std::string s = kYaml;
    s.replace(s.find(from), from.size(), to);
    return error_of([&] { yaml_job(s); });
  };
  EXPECT_NE(with("activation: approx", "activation: aprox").find("memory.activation: expected one of exact, approx; got 'aprox'"),
            std::string::npos);
  EXPECT_NE(with("micro_batch: 2", "micro_batch: 0").find("training.micro_batch: must be > 0, got 0"), std::string::npos);
  EXPECT_NE(with("micro_batch: 2", "micro_batch: 1000000000000").find("training.micro_batch"), std::string::npos);
  EXPECT_NE(with("architecture: gpt2", "architecture: t5").find("model.architecture"), std::string::npos);
  EXPECT_NE(with("steps: 10", "epochs: 2, steps: 10").find("exactly one of steps and epochs"), std::string::npos);
  EXPECT_NE(with("rank: 4", "rank: -2").find("method.lora.rank"), std::string::npos);
  EXPECT_NE(with("output_dir: out", "").find("output_dir: required"), std::string::npos);
  EXPECT_NE(with("format: text", "format: idx").find("data.format"), std::string::npos);
  // A causal LM has no head to train alone (it would train 0 parameters).
  EXPECT_NE(with("kind: lora, lora: {rank: 4, alpha: 8, target_modules: [c_attn]}", "kind: head_only")
                .find("method.kind: head_only trains a classification head, and task causal_lm has none"),
            std::string::npos);
}

TEST(Spec, PresetTurnsOnMemfitsChoicesAndFilesAreRead) {
  std::string s = kYaml;
  s.replace(s.find("memory: {"), 9, "memory: {preset: memfit_best, ");
  const memfit::spec::Job j = yaml_job(s);
  EXPECT_TRUE(j.memory.memory_sharing_norm && j.memory.fused_mlp && j.memory.approx_activation);
  const auto dir = std::filesystem::temp_directory_path() / "memfit-spec-test";
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "job.yml") << kYaml;
  const memfit::spec::Job f = memfit::spec::load_job((dir / "job.yml").string());
  EXPECT_EQ(f.train_path, (dir / "train.txt").string());
  EXPECT_NE(error_of([&] { memfit::spec::load_job((dir / "missing.yaml").string()); }).find("cannot read"),
            std::string::npos);
}

}  // namespace
