#include "spec.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/util/json_util.h>
#include <yaml-cpp/yaml.h>

#include <cerrno>
#include <cstring>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <nlohmann/json.hpp>
#include <sstream>
#include <utility>

namespace memfit::spec {
namespace {

namespace fs = std::filesystem;
namespace pb = google::protobuf;
using json = nlohmann::json;

[[noreturn]] void fail(const std::string& origin, const std::string& msg) {
  throw SpecError(origin + ": " + msg);
}

// ---- YAML -> JSON, guided by the message descriptor ----
// yaml-cpp keeps every scalar as text; the descriptor says what each field wants, so
// that `name: 123` stays a string and `steps: "10"` or `steps: ten` is checked here.
json scalar_for(const YAML::Node& node, const pb::FieldDescriptor* f, const std::string& path,
                const std::string& origin) {
  if (!node.IsScalar()) fail(origin, path + ": expected a single value");
  const std::string s = node.Scalar();
  switch (f->cpp_type()) {
    case pb::FieldDescriptor::CPPTYPE_STRING:
      return s;
    case pb::FieldDescriptor::CPPTYPE_BOOL:
      if (s == "true" || s == "True" || s == "yes") return true;
      if (s == "false" || s == "False" || s == "no") return false;
      fail(origin, path + ": expected true or false, got '" + s + "'");
    case pb::FieldDescriptor::CPPTYPE_INT32:
    case pb::FieldDescriptor::CPPTYPE_INT64:
    case pb::FieldDescriptor::CPPTYPE_UINT32:
    case pb::FieldDescriptor::CPPTYPE_UINT64: {
      errno = 0;
      char* end = nullptr;
      const long long v = std::strtoll(s.c_str(), &end, 10);
      if (s.empty() || *end != '\0' || errno == ERANGE) {
        fail(origin, path + ": expected an integer, got '" + s + "'");
      }
      return v;
    }
    case pb::FieldDescriptor::CPPTYPE_FLOAT:
    case pb::FieldDescriptor::CPPTYPE_DOUBLE: {
      errno = 0;
      char* end = nullptr;
      const double v = std::strtod(s.c_str(), &end);
      if (s.empty() || *end != '\0' || errno == ERANGE || !std::isfinite(v)) {
        fail(origin, path + ": expected a number, got '" + s + "'");
      }
      return v;
    }
    default:
      fail(origin, path + ": unsupported field type");
  }
}

json yaml_message(const YAML::Node& node, const pb::Descriptor* d, const std::string& path,
                  const std::string& origin) {
  if (node.IsNull()) return json::object();
  if (!node.IsMap()) fail(origin, (path.empty() ? std::string("the spec") : path) + ": expected a mapping");
  json out = json::object();
  for (const auto& kv : node) {
    const std::string key = kv.first.Scalar();
    const std::string fpath = path.empty() ? key : path + "." + key;
    const pb::FieldDescriptor* f = d->FindFieldByName(key);
    if (f == nullptr) f = d->FindFieldByCamelcaseName(key);
    if (f == nullptr) fail(origin, fpath + ": unknown field");
    const YAML::Node& v = kv.second;
    if (f->is_repeated()) {
      if (!v.IsSequence()) fail(origin, fpath + ": expected a list");
      json arr = json::array();
      for (size_t i = 0; i < v.size(); ++i) {
        const std::string ipath = fpath + "[" + std::to_string(i) + "]";
        arr.push_back(f->message_type() ? yaml_message(v[i], f->message_type(), ipath, origin)
                                        : scalar_for(v[i], f, ipath, origin));
      }
      out[f->name()] = arr;
    } else if (f->message_type() != nullptr) {
      out[f->name()] = yaml_message(v, f->message_type(), fpath, origin);
    } else {
      out[f->name()] = scalar_for(v, f, fpath, origin);
    }
  }
  return out;
}

// ---- validation helpers ----
template <typename E>
E choice(const std::string& origin, const std::string& field, const std::string& value,
         std::initializer_list<std::pair<const char*, E>> options, const char* dflt = nullptr) {
  const std::string v = value.empty() && dflt ? std::string(dflt) : value;
  std::string names;
  for (const auto& [name, e] : options) {
    if (v == name) return e;
    names += (names.empty() ? "" : ", ") + std::string(name);
  }
  if (v.empty()) fail(origin, field + ": required (one of " + names + ")");
  fail(origin, field + ": expected one of " + names + "; got '" + v + "'");
}

void positive(const std::string& origin, const std::string& field, int64_t v, int64_t max) {
  if (v <= 0) fail(origin, field + ": must be > 0, got " + std::to_string(v));
  if (v > max) fail(origin, field + ": " + std::to_string(v) + " is absurdly large (at most " + std::to_string(max) + ")");
}

void non_negative(const std::string& origin, const std::string& field, int64_t v) {
  if (v < 0) fail(origin, field + ": must be >= 0, got " + std::to_string(v));
}

std::string resolve_path(const std::string& base, const std::string& p) {
  if (p.empty()) return p;
  const fs::path path(p);
  return path.is_absolute() ? path.lexically_normal().string()
                            : (fs::path(base) / path).lexically_normal().string();
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw SpecError(path + ": cannot read the spec file (" + std::strerror(errno) + ")");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

v1::JobSpec parse_json(const std::string& text, const std::string& origin) {
  v1::JobSpec spec;
  pb::util::JsonParseOptions opts;
  opts.ignore_unknown_fields = false;
  const auto status = pb::util::JsonStringToMessage(text, &spec, opts);
  if (!status.ok()) {
    // Protobuf names the field: "Cannot find field: traning in message ...",
    // "(training.steps): invalid value "ten" for type TYPE_INT64".
    fail(origin, "invalid job spec: " + std::string(status.message()));
  }
  return spec;
}

v1::JobSpec parse_yaml(const std::string& text, const std::string& origin) {
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    fail(origin, std::string("not valid YAML: ") + e.what());
  }
  const json j = yaml_message(root, v1::JobSpec::descriptor(), "", origin);
  return parse_json(j.dump(), origin);
}

v1::JobSpec read_spec_file(const std::string& path) {
  const std::string text = read_file(path);
  const std::string ext = fs::path(path).extension().string();
  return (ext == ".yaml" || ext == ".yml") ? parse_yaml(text, path) : parse_json(text, path);
}

Job resolve(const v1::JobSpec& s, const std::string& origin, const std::string& base_dir) {
  Job j;
  j.name = s.name().empty() ? "job" : s.name();
  if (!s.has_model()) fail(origin, "model: required");
  j.architecture = choice<Architecture>(origin, "model.architecture", s.model().architecture(),
                                        {{"gpt2", Architecture::kGPT2},
                                         {"llama", Architecture::kLlama},
                                         {"vit", Architecture::kViT},
                                         {"bert", Architecture::kBert},
                                         {"roberta", Architecture::kRoberta}});
  if (s.model().config_path().empty()) fail(origin, "model.config_path: required (a Hugging Face config.json)");
  j.config_path = resolve_path(base_dir, s.model().config_path());
  j.weights_path = resolve_path(base_dir, s.model().weights_path());
  j.init_seed = s.model().init_seed();

  const bool vision = j.architecture == Architecture::kViT;
  const char* default_task = vision ? "image_classification"
                             : (j.architecture == Architecture::kBert || j.architecture == Architecture::kRoberta)
                                 ? "sequence_classification"
                                 : "causal_lm";
  j.task = choice<Task>(origin, "task", s.task(),
                        {{"causal_lm", Task::kCausalLM},
                         {"sequence_classification", Task::kSequenceClassification},
                         {"image_classification", Task::kImageClassification}},
                        default_task);
  const bool decoder = j.architecture == Architecture::kGPT2 || j.architecture == Architecture::kLlama;
  if (j.task == Task::kCausalLM && !decoder) {
    fail(origin, std::string("task: causal_lm needs a decoder (gpt2 or llama), not ") + name_of(j.architecture));
  }
  if ((j.task == Task::kImageClassification) != vision) {
    fail(origin, std::string("task: ") + name_of(j.task) + " does not fit model.architecture " + name_of(j.architecture));
  }

  if (!s.has_data()) fail(origin, "data: required");
  const v1::DataSpec& d = s.data();
  j.format = choice<DataFormat>(origin, "data.format", d.format(),
                                {{"text", DataFormat::kText},
                                 {"jsonl_text", DataFormat::kJsonlText},
                                 {"jsonl_prompt_completion", DataFormat::kJsonlPromptCompletion},
                                 {"jsonl_classification", DataFormat::kJsonlClassification},
                                 {"idx", DataFormat::kIdx}},
                                vision ? "idx" : nullptr);
  if (d.train_path().empty()) fail(origin, "data.train_path: required");
  j.train_path = resolve_path(base_dir, d.train_path());
  j.validation_path = resolve_path(base_dir, d.validation_path());
  j.tokenizer_path = resolve_path(base_dir, d.tokenizer_path());
  j.train_labels_path = resolve_path(base_dir, d.train_labels_path());
  j.validation_labels_path = resolve_path(base_dir, d.validation_labels_path());
  const bool classify_text = j.format == DataFormat::kJsonlClassification;
  if (j.format == DataFormat::kIdx) {
    if (!vision) fail(origin, "data.format: idx images need model.architecture vit");
    if (j.train_labels_path.empty()) fail(origin, "data.train_labels_path: required for idx data");
    if (!j.validation_path.empty() && j.validation_labels_path.empty()) {
      fail(origin, "data.validation_labels_path: required with an idx validation_path");
    }
  } else {
    if (vision) fail(origin, std::string("data.format: vit needs idx images, not ") + name_of(j.format));
    if (j.tokenizer_path.empty()) fail(origin, "data.tokenizer_path: required for text data");
    if (classify_text != (j.task == Task::kSequenceClassification)) {
      fail(origin, std::string("data.format: ") + name_of(j.format) + " does not fit task " + name_of(j.task));
    }
  }

  const v1::MethodSpec& m = s.method();
  j.method = choice<Method>(origin, "method.kind", m.kind(),
                            {{"full", Method::kFull}, {"lora", Method::kLora}, {"head_only", Method::kHeadOnly}},
                            "lora");
  if (j.method == Method::kLora) {
    if (m.lora().has_rank()) j.lora.rank = m.lora().rank();
    positive(origin, "method.lora.rank", j.lora.rank, 4096);
    if (m.lora().has_alpha()) j.lora.alpha = m.lora().alpha();
    if (!(j.lora.alpha > 0.0)) fail(origin, "method.lora.alpha: must be > 0");
    j.lora.dropout = m.lora().dropout();
    if (!(j.lora.dropout >= 0.0 && j.lora.dropout < 1.0)) {
      fail(origin, "method.lora.dropout: must be in [0, 1), got " + std::to_string(j.lora.dropout));
    }
    j.lora.target_modules.assign(m.lora().target_modules().begin(), m.lora().target_modules().end());
  } else if (m.has_lora()) {
    fail(origin, std::string("method.lora: given but method.kind is ") + name_of(j.method));
  }
  if (j.method == Method::kHeadOnly && j.task == Task::kCausalLM) {
    // A causal LM's output layer is its (usually tied) embedding: there is no head to train
    // alone, and the worker would find no trainable parameter.
    fail(origin, "method.kind: head_only trains a classification head, and task causal_lm has none; use lora or full");
  }

  const v1::MemorySpec& mem = s.memory();
  j.memory.preset = mem.preset() == "custom" ? "" : mem.preset();
  if (!j.memory.preset.empty() && j.memory.preset != "memfit_best" && j.memory.preset != "auto") {
    fail(origin, "memory.preset: expected memfit_best, auto or custom; got '" + mem.preset() + "'");
  }
  j.memory.approx_activation = choice<bool>(origin, "memory.activation", mem.activation(),
                                            {{"exact", false}, {"approx", true}}, "exact");
  j.memory.memory_sharing_norm = choice<bool>(origin, "memory.norm", mem.norm(),
                                              {{"exact", false}, {"memory_sharing", true}}, "exact");
  j.memory.efficient_attention = choice<bool>(origin, "memory.attention", mem.attention(),
                                              {{"standard", false}, {"memory_efficient", true}},
                                              "memory_efficient");
  j.memory.fused_mlp = mem.fused_mlp();
  j.memory.checkpointing = mem.activation_checkpointing();
  j.memory.fused_loss = mem.fused_loss();
  if (j.memory.preset == "memfit_best") {
    j.memory.approx_activation = true;  // used where the next layer keeps nothing
    j.memory.memory_sharing_norm = true;
    j.memory.fused_mlp = true;
    j.memory.efficient_attention = true;
    j.memory.fused_loss = true;
  }

  const v1::TrainingSpec& t = s.training();
  j.training.steps = t.steps();
  j.training.epochs = t.epochs();
  non_negative(origin, "training.steps", j.training.steps);
  non_negative(origin, "training.epochs", j.training.epochs);
  if ((j.training.steps > 0) == (j.training.epochs > 0)) {
    fail(origin, "training: set exactly one of steps and epochs");
  }
  if (j.training.steps > 1000000000) fail(origin, "training.steps: absurdly large");
  if (j.training.epochs > 100000) fail(origin, "training.epochs: absurdly large");
  if (t.has_micro_batch()) j.training.micro_batch = t.micro_batch();
  positive(origin, "training.micro_batch", j.training.micro_batch, 1 << 20);
  if (t.has_gradient_accumulation()) j.training.gradient_accumulation = t.gradient_accumulation();
  positive(origin, "training.gradient_accumulation", j.training.gradient_accumulation, 1 << 16);
  if (t.has_sequence_length()) j.training.sequence_length = t.sequence_length();
  positive(origin, "training.sequence_length", j.training.sequence_length, 1 << 20);
  if (t.has_learning_rate()) j.training.learning_rate = t.learning_rate();
  if (!(j.training.learning_rate > 0.0 && j.training.learning_rate < 10.0)) {
    fail(origin, "training.learning_rate: must be in (0, 10), got " + std::to_string(j.training.learning_rate));
  }
  j.training.warmup_steps = t.warmup_steps();
  non_negative(origin, "training.warmup_steps", j.training.warmup_steps);
  j.training.schedule = choice<Schedule>(origin, "training.schedule", t.schedule(),
                                         {{"constant", Schedule::kConstant},
                                          {"linear", Schedule::kLinear},
                                          {"cosine", Schedule::kCosine}},
                                         "cosine");
  j.training.weight_decay = t.weight_decay();
  if (!(j.training.weight_decay >= 0.0 && j.training.weight_decay < 10.0)) {
    fail(origin, "training.weight_decay: must be in [0, 10)");
  }
  if (t.has_max_grad_norm()) j.training.max_grad_norm = t.max_grad_norm();
  if (!(j.training.max_grad_norm > 0.0)) fail(origin, "training.max_grad_norm: must be > 0");
  j.training.dtype = choice<DType>(origin, "training.dtype", t.dtype(),
                                   {{"fp32", DType::kFloat32}, {"bf16", DType::kBFloat16}}, "fp32");
  j.training.seed = t.seed();
  j.training.eval_interval = t.eval_interval();
  non_negative(origin, "training.eval_interval", j.training.eval_interval);
  j.training.eval_batches = t.eval_batches();
  non_negative(origin, "training.eval_batches", j.training.eval_batches);
  j.training.checkpoint_interval = t.checkpoint_interval();
  non_negative(origin, "training.checkpoint_interval", j.training.checkpoint_interval);
  if (t.has_log_interval()) j.training.log_interval = t.log_interval();
  positive(origin, "training.log_interval", j.training.log_interval, 1 << 30);
  j.training.patience = t.early_stopping().patience();
  if (j.training.patience < 0) fail(origin, "training.early_stopping.patience: must be >= 0");
  j.training.min_delta = t.early_stopping().min_delta();
  if (j.training.patience > 0 && j.validation_path.empty()) {
    fail(origin, "training.early_stopping: needs data.validation_path");
  }

  if (s.output_dir().empty()) fail(origin, "output_dir: required");
  j.output_dir = resolve_path(base_dir, s.output_dir());
  if (s.resources().devices_size() > 0) j.device = s.resources().devices(0);
  if (j.device != "cpu" && j.device.rfind("cuda", 0) != 0) {
    fail(origin, "resources.devices[0]: expected cpu or cuda:N, got '" + j.device + "'");
  }
  return j;
}

v1::MemorySpec memory_to_spec(const Memory& m) {
  v1::MemorySpec s;
  s.set_activation(m.approx_activation ? "approx" : "exact");
  s.set_norm(m.memory_sharing_norm ? "memory_sharing" : "exact");
  s.set_fused_mlp(m.fused_mlp);
  s.set_attention(m.efficient_attention ? "memory_efficient" : "standard");
  s.set_activation_checkpointing(m.checkpointing);
  s.set_fused_loss(m.fused_loss);
  if (!m.preset.empty() && m.preset != "auto") s.set_preset(m.preset);
  return s;
}

Job load_job(const std::string& path) {
  const v1::JobSpec spec = read_spec_file(path);
  const std::string base = fs::absolute(fs::path(path)).parent_path().string();
  return resolve(spec, path, base);
}

}  // namespace memfit::spec
