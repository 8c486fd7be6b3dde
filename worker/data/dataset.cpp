#include "dataset.h"

#include <ATen/ATen.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <functional>
#include <memory>
#include <sstream>

#include "confined.h"

namespace memfit::data {
namespace {

using json = nlohmann::json;

std::string read_text(const std::string& path, const char* field) {
  try {
    return fsx::InputFile(path).read_all();
  } catch (const fsx::FsError& e) {
    throw DataError(std::string(field) + ": cannot read " + e.what());
  }
}

// Reads a file that may be gzip-compressed (IDX files usually are).
std::vector<uint8_t> read_maybe_gz(const std::string& path, const char* field) {
  int fd = -1;
  try {
    fd = fsx::open_input(path);
  } catch (const fsx::FsError& e) {
    throw DataError(std::string(field) + ": cannot read " + e.what());
  }
  gzFile f = gzdopen(fd, "rb");  // owns fd from here
  if (f == nullptr) {
    ::close(fd);
    throw DataError(std::string(field) + ": " + path + ": cannot read (" + std::strerror(errno) + ")");
  }
  std::vector<uint8_t> out;
  uint8_t buf[1 << 16];
  int n;
  while ((n = gzread(f, buf, sizeof buf)) > 0) out.insert(out.end(), buf, buf + n);
  const bool bad = n < 0;
  gzclose(f);
  if (bad) throw DataError(std::string(field) + ": " + path + ": corrupt gzip data");
  return out;
}

// Calls fn for each row of a JSONL file, one line at a time: the file is read through a
// 1 MiB buffer and no more than one row is held, so memory follows the tokens kept, not
// the file (a line longer than 64 MiB is refused).
void for_each_jsonl(const std::string& path, const char* field, const std::function<void(const json&)>& fn) {
  constexpr size_t kMaxLine = size_t{64} << 20;
  std::unique_ptr<fsx::InputFile> file;
  try {
    file = std::make_unique<fsx::InputFile>(path);
  } catch (const fsx::FsError& e) {
    throw DataError(std::string(field) + ": cannot read " + e.what());
  }
  std::vector<char> buf(size_t{1} << 20);
  std::string line;
  int64_t lineno = 0;
  off_t off = 0;
  auto row = [&] {
    ++lineno;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t\r") == std::string::npos) return;
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      throw DataError(path + ":" + std::to_string(lineno) + ": not valid JSON: " + e.what());
    }
    if (!j.is_object()) throw DataError(path + ":" + std::to_string(lineno) + ": expected a JSON object");
    j["__line"] = lineno;
    fn(j);
  };
  for (;;) {
    const ssize_t n = ::pread(file->fd(), buf.data(), buf.size(), off);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw DataError(std::string(field) + ": " + path + ": cannot read (" + std::strerror(errno) + ")");
    if (n == 0) break;
    off += n;
    size_t start = 0;
    for (size_t k = 0; k < static_cast<size_t>(n); ++k) {
      if (buf[k] != '\n') continue;
      line.append(buf.data() + start, k - start);
      row();
      line.clear();
      start = k + 1;
    }
    line.append(buf.data() + start, static_cast<size_t>(n) - start);
    if (line.size() > kMaxLine) {
      throw DataError(path + ":" + std::to_string(lineno + 1) + ": a line longer than 64 MiB");
    }
  }
  if (!line.empty()) row();
}

std::string field_string(const json& row, const char* key, const std::string& path) {
  const std::string where = path + ":" + std::to_string(row["__line"].get<int64_t>());
  if (!row.contains(key)) throw DataError(where + ": missing \"" + key + "\"");
  if (!row[key].is_string()) throw DataError(where + ": \"" + key + "\" must be a string");
  return row[key].get<std::string>();
}

// ---- causal LM over a packed token stream ----
class PackedText final : public Dataset {
 public:
  PackedText(std::vector<int64_t> tokens, int64_t seq) : tokens_(std::move(tokens)), seq_(seq) {}
  int64_t size() const override { return static_cast<int64_t>(tokens_.size()) / seq_; }
  model::Batch batch(const std::vector<int64_t>& idx, const at::Device& device) const override {
    at::Tensor ids = at::empty({static_cast<int64_t>(idx.size()), seq_}, at::kLong);
    int64_t* p = ids.data_ptr<int64_t>();
    for (size_t b = 0; b < idx.size(); ++b) {
      std::copy_n(tokens_.begin() + idx[b] * seq_, seq_, p + static_cast<int64_t>(b) * seq_);
    }
    model::Batch out;
    out.input_ids = ids.to(device);
    out.labels = out.input_ids;
    return out;
  }
  std::string describe() const override {
    return std::to_string(size()) + " sequences of " + std::to_string(seq_) + " tokens (" +
           std::to_string(tokens_.size()) + " tokens)";
  }

 private:
  std::vector<int64_t> tokens_;
  int64_t seq_;
};

// ---- variable-length examples, padded per batch ----
struct Seq {
  std::vector<int64_t> ids, labels;  // labels: per token (LM) or one (classification)
};

class Padded final : public Dataset {
 public:
  Padded(std::vector<Seq> rows, int64_t pad, bool classification, std::string what)
      : rows_(std::move(rows)), pad_(pad), classification_(classification), what_(std::move(what)) {}
  int64_t size() const override { return static_cast<int64_t>(rows_.size()); }
  model::Batch batch(const std::vector<int64_t>& idx, const at::Device& device) const override {
    int64_t S = 1;
    for (int64_t i : idx) S = std::max<int64_t>(S, static_cast<int64_t>(rows_[static_cast<size_t>(i)].ids.size()));
    const int64_t B = static_cast<int64_t>(idx.size());
    at::Tensor ids = at::full({B, S}, pad_, at::kLong);
    at::Tensor mask = at::zeros({B, S}, at::kBool);
    at::Tensor labels = classification_ ? at::empty({B}, at::kLong) : at::full({B, S}, -100, at::kLong);
    for (int64_t b = 0; b < B; ++b) {
      const Seq& r = rows_[static_cast<size_t>(idx[static_cast<size_t>(b)])];
      const int64_t n = static_cast<int64_t>(r.ids.size());
      std::copy(r.ids.begin(), r.ids.end(), ids.data_ptr<int64_t>() + b * S);
      std::fill_n(mask.data_ptr<bool>() + b * S, n, true);
      if (classification_) {
        labels.data_ptr<int64_t>()[b] = r.labels[0];
      } else {
        std::copy(r.labels.begin(), r.labels.end(), labels.data_ptr<int64_t>() + b * S);
      }
    }
    model::Batch out;
    out.input_ids = ids.to(device);
    out.attention_mask = mask.to(device);
    out.labels = labels.to(device);
    return out;
  }
  std::string describe() const override { return std::to_string(size()) + " " + what_; }

 private:
  std::vector<Seq> rows_;
  int64_t pad_;
  bool classification_;
  std::string what_;
};

// ---- IDX images ----
uint32_t be32(const uint8_t* p) { return (uint32_t(p[0]) << 24) | (uint32_t(p[1]) << 16) | (uint32_t(p[2]) << 8) | p[3]; }

class Images final : public Dataset {
 public:
  Images(const std::string& images_path, const std::string& labels_path, const model::ModelConfig& cfg,
         const char* field) : cfg_(cfg) {
    const std::vector<uint8_t> im = read_maybe_gz(images_path, field);
    const std::vector<uint8_t> lb = read_maybe_gz(labels_path, field);
    if (im.size() < 16 || be32(im.data()) != 0x00000803) {
      throw DataError(std::string(field) + ": " + images_path + ": not an IDX image file (magic 0x00000803)");
    }
    if (lb.size() < 8 || be32(lb.data()) != 0x00000801) {
      throw DataError(std::string(field) + ": " + labels_path + ": not an IDX label file (magic 0x00000801)");
    }
    n_ = be32(im.data() + 4);
    h_ = be32(im.data() + 8);
    w_ = be32(im.data() + 12);
    if (im.size() != 16 + static_cast<size_t>(n_) * h_ * w_) {
      throw DataError(std::string(field) + ": " + images_path + ": " + std::to_string(im.size()) +
                      " bytes, the header promises " + std::to_string(16 + static_cast<size_t>(n_) * h_ * w_));
    }
    if (be32(lb.data() + 4) != static_cast<uint32_t>(n_) || lb.size() != 8 + static_cast<size_t>(n_)) {
      throw DataError(std::string(field) + ": " + labels_path + ": " + std::to_string(lb.size() - 8) +
                      " labels for " + std::to_string(n_) + " images");
    }
    if (n_ == 0) throw DataError(std::string(field) + ": " + images_path + ": no images");
    pixels_.assign(im.begin() + 16, im.end());
    labels_.assign(lb.begin() + 8, lb.end());
    for (size_t i = 0; i < labels_.size(); ++i) {
      if (labels_[i] >= cfg.num_labels) {
        throw DataError(std::string(field) + ": " + labels_path + ": label " + std::to_string(labels_[i]) + " of image " +
                        std::to_string(i) + " is out of range for " + std::to_string(cfg.num_labels) + " classes");
      }
    }
  }
  int64_t size() const override { return n_; }
  model::Batch batch(const std::vector<int64_t>& idx, const at::Device& device) const override {
    const int64_t B = static_cast<int64_t>(idx.size());
    at::Tensor raw = at::empty({B, 1, h_, w_}, at::kByte);
    at::Tensor y = at::empty({B}, at::kLong);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t i = idx[static_cast<size_t>(b)];
      std::copy_n(pixels_.begin() + i * h_ * w_, h_ * w_, raw.data_ptr<uint8_t>() + b * h_ * w_);
      y.data_ptr<int64_t>()[b] = labels_[static_cast<size_t>(i)];
    }
    // Scale to the model's size (bilinear), replicate grey to its channels, and normalise
    // as ViTImageProcessor does: (x / 255 - 0.5) / 0.5.
    at::Tensor x = raw.to(at::kFloat).div_(255.0);
    if (h_ != cfg_.image_size || w_ != cfg_.image_size) {
      x = at::upsample_bilinear2d(x, {cfg_.image_size, cfg_.image_size}, /*align_corners=*/false);
    }
    x = x.sub_(0.5).div_(0.5).expand({B, cfg_.channels, cfg_.image_size, cfg_.image_size}).contiguous();
    model::Batch out;
    out.pixels = x.to(device);
    out.labels = y.to(device);
    return out;
  }
  std::string describe() const override {
    return std::to_string(n_) + " images of " + std::to_string(h_) + "x" + std::to_string(w_);
  }

 private:
  const model::ModelConfig& cfg_;
  int64_t n_ = 0, h_ = 0, w_ = 0;
  std::vector<uint8_t> pixels_, labels_;
};

}  // namespace

std::unique_ptr<Dataset> load_dataset(const spec::Job& job, bool validation, const Tokenizer* tok,
                                      const model::ModelConfig& cfg) {
  const std::string& path = validation ? job.validation_path : job.train_path;
  const char* field = validation ? "data.validation_path" : "data.train_path";
  if (path.empty()) return nullptr;
  const int64_t S = job.training.sequence_length;
  std::unique_ptr<Dataset> ds;
  switch (job.format) {
    case spec::DataFormat::kIdx:
      ds = std::make_unique<Images>(path, validation ? job.validation_labels_path : job.train_labels_path, cfg, field);
      break;
    case spec::DataFormat::kText:
    case spec::DataFormat::kJsonlText: {
      std::vector<int64_t> tokens;
      if (job.format == spec::DataFormat::kText) {
        tokens = tok->encode(read_text(path, field));
      } else {
        for_each_jsonl(path, field, [&](const json& row) {
          const std::vector<int64_t> t = tok->encode(field_string(row, "text", path));
          tokens.insert(tokens.end(), t.begin(), t.end());
          if (tok->eos >= 0) tokens.push_back(tok->eos);
        });
      }
      if (static_cast<int64_t>(tokens.size()) < S) {
        throw DataError(std::string(field) + ": " + path + ": " + std::to_string(tokens.size()) +
                        " tokens, fewer than one sequence of training.sequence_length " + std::to_string(S));
      }
      ds = std::make_unique<PackedText>(std::move(tokens), S);
      break;
    }
    case spec::DataFormat::kJsonlPromptCompletion:
    case spec::DataFormat::kJsonlClassification: {
      const bool classify = job.format == spec::DataFormat::kJsonlClassification;
      std::vector<Seq> rows;
      for_each_jsonl(path, field, [&](const json& row) {
        Seq s;
        if (classify) {
          if (tok->cls >= 0 && job.architecture != spec::Architecture::kGPT2) s.ids.push_back(tok->cls);
          const std::vector<int64_t> t = tok->encode(field_string(row, "text", path));
          s.ids.insert(s.ids.end(), t.begin(), t.end());
          // GPT-2 has no separator: its rows may use the whole sequence_length.
          const bool sep = tok->sep >= 0 && job.architecture != spec::Architecture::kGPT2;
          const int64_t room = S - (sep ? 1 : 0);
          if (static_cast<int64_t>(s.ids.size()) > room) s.ids.resize(static_cast<size_t>(std::max<int64_t>(room, 1)));
          if (sep) s.ids.push_back(tok->sep);
          const std::string where = path + ":" + std::to_string(row["__line"].get<int64_t>());
          if (!row.contains("label") || !row["label"].is_number_integer()) {
            throw DataError(where + ": \"label\" must be an integer class index");
          }
          const int64_t label = row["label"].get<int64_t>();
          if (label < 0 || label >= cfg.num_labels) {
            throw DataError(where + ": label " + std::to_string(label) + " is out of range for " +
                            std::to_string(cfg.num_labels) + " classes");
          }
          s.labels = {label};
        } else {
          std::vector<int64_t> prompt = tok->encode(field_string(row, "prompt", path));
          std::vector<int64_t> completion = tok->encode(field_string(row, "completion", path));
          if (tok->bos >= 0 && job.architecture == spec::Architecture::kLlama) prompt.insert(prompt.begin(), tok->bos);
          if (tok->eos >= 0) completion.push_back(tok->eos);
          s.ids = prompt;
          s.ids.insert(s.ids.end(), completion.begin(), completion.end());
          s.labels.assign(prompt.size(), -100);
          s.labels.insert(s.labels.end(), completion.begin(), completion.end());
          if (static_cast<int64_t>(s.ids.size()) > S) {
            s.ids.resize(static_cast<size_t>(S));
            s.labels.resize(static_cast<size_t>(S));
          }
          // The loss predicts token t+1 from t: a sequence needs a completion token past
          // position 0 to count.
          if (std::count_if(s.labels.begin() + 1, s.labels.end(), [](int64_t v) { return v != -100; }) == 0) return;
        }
        if (!s.ids.empty()) rows.push_back(std::move(s));
      });
      const int64_t pad = tok->pad >= 0 ? tok->pad : 0;
      ds = std::make_unique<Padded>(std::move(rows), pad, classify, classify ? "labelled texts" : "prompt/completion pairs");
      break;
    }
  }
  if (ds->size() == 0) throw DataError(std::string(field) + ": " + path + ": no usable examples");
  return ds;
}

Sampler::Sampler(int64_t n, int64_t batch, uint64_t seed, bool shuffle)
    : n_(n), batch_(batch), seed_(seed), shuffle_(shuffle) {
  shuffle_epoch();
}

void Sampler::shuffle_epoch() {
  order_.resize(static_cast<size_t>(n_));
  for (int64_t i = 0; i < n_; ++i) order_[static_cast<size_t>(i)] = i;
  if (!shuffle_) return;
  std::mt19937_64 rng(seed_ + static_cast<uint64_t>(epoch_) * 0x9E3779B97F4A7C15ull);
  for (int64_t i = n_ - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1));
    std::swap(order_[static_cast<size_t>(i)], order_[static_cast<size_t>(j)]);
  }
}

std::vector<int64_t> Sampler::next() {
  if (offset_ + batch_ > n_) {  // drop the last partial batch; next epoch
    ++epoch_;
    offset_ = 0;
    shuffle_epoch();
  }
  std::vector<int64_t> out;
  const int64_t take = std::min(batch_, n_);
  for (int64_t i = 0; i < take; ++i) out.push_back(order_[static_cast<size_t>(offset_ + i)]);
  offset_ += take;
  return out;
}

void Sampler::seek(int64_t epoch, int64_t offset) {
  epoch_ = epoch;
  offset_ = offset;
  shuffle_epoch();
}

}  // namespace memfit::data
