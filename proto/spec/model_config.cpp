#include "model_config.h"

#include "confined.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>

namespace memfit::model {
namespace {

using json = nlohmann::json;

struct Reader {
  const json& j;
  const std::string& path;

  [[noreturn]] void fail(const std::string& key, const std::string& msg) const {
    throw ConfigError(path + ": " + key + ": " + msg);
  }
  bool has(const char* key) const { return j.contains(key) && !j[key].is_null(); }
  int64_t integer(const char* key, int64_t min, int64_t max) const {
    if (!has(key)) fail(key, "missing");
    if (!j[key].is_number_integer()) fail(key, "expected an integer");
    const int64_t v = j[key].get<int64_t>();
    if (v < min || v > max) {
      fail(key, std::to_string(v) + " is out of range [" + std::to_string(min) + ", " + std::to_string(max) + "]");
    }
    return v;
  }
  int64_t integer_or(const char* key, int64_t dflt, int64_t min, int64_t max) const {
    return has(key) ? integer(key, min, max) : dflt;
  }
  double number_or(const char* key, double dflt) const {
    if (!has(key)) return dflt;
    if (!j[key].is_number()) fail(key, "expected a number");
    return j[key].get<double>();
  }
  bool boolean_or(const char* key, bool dflt) const {
    if (!has(key)) return dflt;
    if (!j[key].is_boolean()) fail(key, "expected true or false");
    return j[key].get<bool>();
  }
  std::string string_or(const char* key, const std::string& dflt) const {
    if (!has(key)) return dflt;
    if (!j[key].is_string()) fail(key, "expected a string");
    return j[key].get<std::string>();
  }
};

constexpr int64_t kBig = int64_t{1} << 24;  // 16M: no real dimension is larger

}  // namespace

ModelConfig load_config(const std::string& path, spec::Architecture arch, int64_t num_labels_hint) {
  std::string text;
  try {
    fsx::InputFile f(path);
    if (f.size() > (int64_t{16} << 20)) throw ConfigError(path + ": a model config larger than 16 MiB");
    text = f.read_all(int64_t{16} << 20);
  } catch (const fsx::FsError& e) {
    throw ConfigError(std::string("cannot read the model config: ") + e.what());
  }
  return parse_config(text, path, arch, num_labels_hint);
}

ModelConfig parse_config(const std::string& text, const std::string& path, spec::Architecture arch,
                         int64_t num_labels_hint) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    // The byte offset only: the message of a parse error quotes the text.
    throw ConfigError(path + ": not valid JSON (error at byte " + std::to_string(e.byte) + ")");
  } catch (const json::exception&) {
    throw ConfigError(path + ": not valid JSON");
  }
  if (!j.is_object()) throw ConfigError(path + ": not a JSON object");
  const Reader r{j, path};
  ModelConfig c;
  c.arch = arch;
  switch (arch) {
    case spec::Architecture::kGPT2:
      c.vocab_size = r.integer("vocab_size", 1, kBig);
      c.hidden = r.integer("n_embd", 1, kBig);
      c.layers = r.integer("n_layer", 1, 4096);
      c.heads = r.integer("n_head", 1, 4096);
      c.kv_heads = c.heads;
      c.intermediate = r.integer_or("n_inner", 4 * c.hidden, 1, kBig);
      c.max_positions = r.integer("n_positions", 1, kBig);
      c.norm_eps = r.number_or("layer_norm_epsilon", 1e-5);
      c.activation = r.string_or("activation_function", "gelu_new");
      c.tie_word_embeddings = r.boolean_or("tie_word_embeddings", true);
      break;
    case spec::Architecture::kLlama:
      c.vocab_size = r.integer("vocab_size", 1, kBig);
      c.hidden = r.integer("hidden_size", 1, kBig);
      c.layers = r.integer("num_hidden_layers", 1, 4096);
      c.heads = r.integer("num_attention_heads", 1, 4096);
      c.kv_heads = r.integer_or("num_key_value_heads", c.heads, 1, 4096);
      c.intermediate = r.integer("intermediate_size", 1, kBig);
      c.max_positions = r.integer_or("max_position_embeddings", 4096, 1, kBig);
      c.norm_eps = r.number_or("rms_norm_eps", 1e-6);
      c.activation = r.string_or("hidden_act", "silu");
      c.tie_word_embeddings = r.boolean_or("tie_word_embeddings", false);
      c.rope_theta = r.number_or("rope_theta", 10000.0);
      c.qkv_bias = r.boolean_or("attention_bias", false);
      c.mlp_bias = r.boolean_or("mlp_bias", false);
      if (r.has("rope_scaling")) r.fail("rope_scaling", "RoPE scaling is not supported");
      if (c.heads % c.kv_heads != 0) {
        r.fail("num_key_value_heads", std::to_string(c.kv_heads) + " does not divide num_attention_heads " +
                                          std::to_string(c.heads));
      }
      break;
    case spec::Architecture::kViT:
      c.hidden = r.integer("hidden_size", 1, kBig);
      c.layers = r.integer("num_hidden_layers", 1, 4096);
      c.heads = r.integer("num_attention_heads", 1, 4096);
      c.kv_heads = c.heads;
      c.intermediate = r.integer("intermediate_size", 1, kBig);
      c.norm_eps = r.number_or("layer_norm_eps", 1e-12);
      c.activation = r.string_or("hidden_act", "gelu");
      c.image_size = r.integer("image_size", 1, 1 << 16);
      c.patch_size = r.integer("patch_size", 1, 1 << 16);
      c.channels = r.integer_or("num_channels", 3, 1, 64);
      c.qkv_bias = r.boolean_or("qkv_bias", true);
      if (c.image_size % c.patch_size != 0) r.fail("patch_size", "does not divide image_size");
      c.max_positions = (c.image_size / c.patch_size) * (c.image_size / c.patch_size) + 1;
      break;
    case spec::Architecture::kBert:
    case spec::Architecture::kRoberta:
      c.vocab_size = r.integer("vocab_size", 1, kBig);
      c.hidden = r.integer("hidden_size", 1, kBig);
      c.layers = r.integer("num_hidden_layers", 1, 4096);
      c.heads = r.integer("num_attention_heads", 1, 4096);
      c.kv_heads = c.heads;
      c.intermediate = r.integer("intermediate_size", 1, kBig);
      c.max_positions = r.integer("max_position_embeddings", 1, kBig);
      c.norm_eps = r.number_or("layer_norm_eps", 1e-12);
      c.activation = r.string_or("hidden_act", "gelu");
      c.type_vocab_size = r.integer_or("type_vocab_size", 2, 0, 1 << 16);
      c.pad_token_id = r.integer_or("pad_token_id", arch == spec::Architecture::kRoberta ? 1 : 0, 0, kBig);
      break;
  }
  if (c.hidden % c.heads != 0) {
    r.fail(arch == spec::Architecture::kGPT2 ? "n_head" : "num_attention_heads",
           std::to_string(c.heads) + " does not divide the hidden size " + std::to_string(c.hidden));
  }
  if (!(c.norm_eps > 0.0 && c.norm_eps < 1.0)) r.fail("norm epsilon", "must be in (0, 1)");
  const std::string act = c.activation;
  if (act != "gelu" && act != "gelu_new" && act != "gelu_pytorch_tanh" && act != "silu" && act != "relu") {
    r.fail("activation", "unsupported activation '" + act + "' (gelu, gelu_new, gelu_pytorch_tanh, silu, relu)");
  }
  if (arch == spec::Architecture::kLlama && act != "silu") r.fail("hidden_act", "LLaMA needs silu");
  // Classification: labels from the spec's data, else the config.
  int64_t labels = num_labels_hint;
  if (labels <= 0 && r.has("num_labels")) labels = r.integer("num_labels", 1, 1 << 20);
  if (labels <= 0 && r.has("id2label")) {
    if (!j["id2label"].is_object()) r.fail("id2label", "expected an object");
    labels = static_cast<int64_t>(j["id2label"].size());
  }
  c.num_labels = labels;
  return c;
}

}  // namespace memfit::model
