// Training and validation data for a job: text (plain or JSONL) through a tokenizer, or
// IDX images. Builds batches as tensors for the models. Errors (unreadable file, bad
// JSON line, empty dataset, label out of range) are DataError naming file and line.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "model_config.h"
#include "model/model.h"
#include "spec.h"
#include "tokenizer.h"

namespace memfit::data {

class DataError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class Dataset {
 public:
  virtual ~Dataset() = default;
  virtual int64_t size() const = 0;
  // Examples `idx` as one batch on `device`.
  virtual model::Batch batch(const std::vector<int64_t>& idx, const at::Device& device) const = 0;
  // Human-readable summary ("1234 sequences of 128 tokens").
  virtual std::string describe() const = 0;
};

// The train (validation = false) or validation split of a job; nullptr when the job has
// no validation_path.
std::unique_ptr<Dataset> load_dataset(const spec::Job& job, bool validation, const Tokenizer* tok,
                                      const model::ModelConfig& cfg);

// Seeded, resumable order over a dataset: epoch e visits a permutation drawn from
// mt19937_64(seed + e) by Fisher-Yates, so a position (epoch, offset) fully determines
// what comes next.
class Sampler {
 public:
  Sampler(int64_t n, int64_t batch, uint64_t seed, bool shuffle);
  std::vector<int64_t> next();  // one batch of indices; wraps to the next epoch
  int64_t epoch() const { return epoch_; }
  int64_t offset() const { return offset_; }
  void seek(int64_t epoch, int64_t offset);
  int64_t batches_per_epoch() const { return n_ / batch_; }

 private:
  void shuffle_epoch();
  int64_t n_, batch_;
  uint64_t seed_;
  bool shuffle_;
  int64_t epoch_ = 0, offset_ = 0;
  std::vector<int64_t> order_;
};

}  // namespace memfit::data
