// The validated job: plain types shared by the worker, the daemon, the CLI and the
// memory estimator. No protobuf, no LibTorch (spec.h reads spec files into a Job).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace memfit::spec {

class SpecError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Architecture { kGPT2, kLlama, kViT, kBert, kRoberta };
enum class Task { kCausalLM, kSequenceClassification, kImageClassification };
enum class DataFormat { kText, kJsonlText, kJsonlPromptCompletion, kJsonlClassification, kIdx };
enum class Method { kFull, kLora, kHeadOnly };
enum class Schedule { kConstant, kLinear, kCosine };
enum class DType { kFloat32, kBFloat16 };

const char* name_of(Architecture a);
const char* name_of(Task t);
const char* name_of(DataFormat f);
const char* name_of(Method m);

// The memory options after applying the preset.
struct Memory {
  bool approx_activation = false;   // ReGELU2 / ReSiLU2
  bool memory_sharing_norm = false; // MS norms, affine merged into the next linears
  bool fused_mlp = false;           // keep pre-activations, recompute in backward
  bool efficient_attention = true;  // memfit's attention (vs the softmax composite)
  bool checkpointing = false;       // recompute each block in backward
  bool fused_loss = false;          // LM head + loss in chunks, gradient formed in forward
  std::string preset;               // "memfit_best", "auto" (fit to the device) or ""
};

struct Lora {
  int64_t rank = 8;
  double alpha = 16.0;
  double dropout = 0.0;
  std::vector<std::string> target_modules;  // empty: every linear of the blocks
};

struct Training {
  int64_t steps = 0;
  int64_t epochs = 0;
  int64_t micro_batch = 8;
  int64_t gradient_accumulation = 1;
  int64_t sequence_length = 128;
  double learning_rate = 1e-4;
  int64_t warmup_steps = 0;
  Schedule schedule = Schedule::kCosine;
  double weight_decay = 0.0;
  double max_grad_norm = 1.0;
  DType dtype = DType::kFloat32;
  uint64_t seed = 0;
  int64_t eval_interval = 0;        // 0: evaluate at the end only
  int64_t eval_batches = 0;         // 0: the whole validation split
  int64_t checkpoint_interval = 0;  // 0: checkpoint at the end only
  int64_t log_interval = 1;
  int patience = 0;                 // early stopping; 0 = off
  double min_delta = 0.0;
};

// A validated job with absolute paths and defaults filled in.
struct Job {
  std::string name;
  Architecture architecture = Architecture::kGPT2;
  std::string config_path;
  std::string weights_path;  // "" = random init
  uint64_t init_seed = 0;
  Task task = Task::kCausalLM;
  DataFormat format = DataFormat::kText;
  std::string train_path, validation_path, tokenizer_path;
  std::string train_labels_path, validation_labels_path;
  Method method = Method::kLora;
  Lora lora;
  Memory memory;
  Training training;
  std::string output_dir;
  std::string device = "cpu";
};

}  // namespace memfit::spec
