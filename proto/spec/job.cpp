#include "job.h"

namespace memfit::spec {

const char* name_of(Architecture a) {
  switch (a) {
    case Architecture::kGPT2: return "gpt2";
    case Architecture::kLlama: return "llama";
    case Architecture::kViT: return "vit";
    case Architecture::kBert: return "bert";
    case Architecture::kRoberta: return "roberta";
  }
  return "?";
}
const char* name_of(Task t) {
  switch (t) {
    case Task::kCausalLM: return "causal_lm";
    case Task::kSequenceClassification: return "sequence_classification";
    case Task::kImageClassification: return "image_classification";
  }
  return "?";
}
const char* name_of(DataFormat f) {
  switch (f) {
    case DataFormat::kText: return "text";
    case DataFormat::kJsonlText: return "jsonl_text";
    case DataFormat::kJsonlPromptCompletion: return "jsonl_prompt_completion";
    case DataFormat::kJsonlClassification: return "jsonl_classification";
    case DataFormat::kIdx: return "idx";
  }
  return "?";
}
const char* name_of(Method m) {
  switch (m) {
    case Method::kFull: return "full";
    case Method::kLora: return "lora";
    case Method::kHeadOnly: return "head_only";
  }
  return "?";
}

}  // namespace memfit::spec
