// Reading and writing the safetensors format (Hugging Face): an 8-byte little-endian
// header length, a JSON header {name: {"dtype", "shape", "data_offsets"}, "__metadata__":
// {...}}, then the raw tensor bytes. No LibTorch here: raw bytes in and out.
//
//   auto f = memfit::io::SafetensorsFile::open("model.safetensors");   // throws IoError
//   for (const auto& t : f.tensors()) use(t.name, t.dtype, t.shape, f.data(t));
//
// The reader checks everything a lying or truncated file could get wrong and names the
// file and tensor in its error: header length past the end, bad JSON, unknown dtype,
// negative or overflowing shapes, offsets out of range, sizes that do not match the
// shape, overlapping tensors. Files are memory-mapped read-only.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace memfit::io {

class IoError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class StDType { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU8, kBool };

const char* dtype_name(StDType t);  // "F32", ...
size_t dtype_size(StDType t);

struct StTensorInfo {
  std::string name;
  StDType dtype = StDType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0, end = 0;  // offsets into the data section
  int64_t numel() const;
};

class SafetensorsFile {
 public:
  static SafetensorsFile open(const std::string& path);
  SafetensorsFile(SafetensorsFile&&) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&&) noexcept;
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  const std::vector<StTensorInfo>& tensors() const { return tensors_; }
  const StTensorInfo* find(const std::string& name) const;
  const uint8_t* data(const StTensorInfo& t) const { return data_ + t.begin; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  const uint8_t* data_ = nullptr;
  std::vector<StTensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// One .safetensors file, or a sharded checkpoint through its model.safetensors.index.json
// (weight_map: tensor name -> shard file in the index's folder).
class Checkpoint {
 public:
  static Checkpoint open(const std::string& path);
  std::vector<std::string> names() const;
  // The tensor and the file holding it, or {nullptr, nullptr}.
  std::pair<const SafetensorsFile*, const StTensorInfo*> find(const std::string& name) const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<size_t, const StTensorInfo*>> where_;
};

// A tensor to write: bytes are copied as given (row-major, little-endian).
struct StTensorView {
  std::string name;
  StDType dtype = StDType::kF32;
  std::vector<int64_t> shape;
  const void* data = nullptr;
  size_t nbytes = 0;
};

// Writes atomically: to path + ".tmp", fsync, then rename over path, so that a crash
// never leaves a half-written file where a good one was.
void write_safetensors(const std::string& path, const std::vector<StTensorView>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

// Writes `contents` to `path` the same atomic way (for JSON files next to weights).
void write_file_atomic(const std::string& path, const std::string& contents);

}  // namespace memfit::io
