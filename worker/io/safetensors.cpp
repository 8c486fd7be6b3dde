#include "safetensors.h"

#include "confined.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

namespace memfit::io {
namespace {

using json = nlohmann::json;

[[noreturn]] void fail(const std::string& path, const std::string& msg) {
  throw IoError(path + ": " + msg);
}

bool parse_dtype(const std::string& s, StDType* out) {
  static const std::pair<const char*, StDType> kNames[] = {
      {"F64", StDType::kF64}, {"F32", StDType::kF32}, {"F16", StDType::kF16},
      {"BF16", StDType::kBF16}, {"I64", StDType::kI64}, {"I32", StDType::kI32},
      {"I16", StDType::kI16}, {"I8", StDType::kI8}, {"U8", StDType::kU8},
      {"BOOL", StDType::kBool}};
  for (const auto& [name, t] : kNames) {
    if (s == name) {
      *out = t;
      return true;
    }
  }
  return false;
}

// Header length limit, as in the reference implementation (100 MB).
constexpr uint64_t kMaxHeader = 100u << 20;

}  // namespace

const char* dtype_name(StDType t) {
  switch (t) {
    case StDType::kF64: return "F64";
    case StDType::kF32: return "F32";
    case StDType::kF16: return "F16";
    case StDType::kBF16: return "BF16";
    case StDType::kI64: return "I64";
    case StDType::kI32: return "I32";
    case StDType::kI16: return "I16";
    case StDType::kI8: return "I8";
    case StDType::kU8: return "U8";
    case StDType::kBool: return "BOOL";
  }
  return "?";
}

size_t dtype_size(StDType t) {
  switch (t) {
    case StDType::kF64: case StDType::kI64: return 8;
    case StDType::kF32: case StDType::kI32: return 4;
    case StDType::kF16: case StDType::kBF16: case StDType::kI16: return 2;
    case StDType::kI8: case StDType::kU8: case StDType::kBool: return 1;
  }
  return 1;
}

int64_t StTensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& o) noexcept { *this = std::move(o); }

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& o) noexcept {
  if (this != &o) {
    if (map_ != nullptr) munmap(map_, map_size_);
    path_ = std::move(o.path_);
    map_ = o.map_;
    map_size_ = o.map_size_;
    data_ = o.data_;
    tensors_ = std::move(o.tensors_);
    index_ = std::move(o.index_);
    metadata_ = std::move(o.metadata_);
    o.map_ = nullptr;
    o.map_size_ = 0;
    o.data_ = nullptr;
  }
  return *this;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_ != nullptr) munmap(map_, map_size_);
}

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile f;
  f.path_ = path;
  int fd = -1;
  try {
    fd = fsx::open_input(path);  // beneath the job's input roots (or its own outputs)
  } catch (const fsx::FsError& e) {
    throw IoError(std::string("cannot open ") + e.what());
  }
  struct stat st {};
  if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    ::close(fd);
    fail(path, "truncated: " + std::to_string(size) + " bytes, shorter than the 8-byte header length");
  }
  void* map = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map == MAP_FAILED) fail(path, std::string("cannot map: ") + std::strerror(errno));
  f.map_ = map;
  f.map_size_ = size;
  const uint8_t* bytes = static_cast<const uint8_t*>(map);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | bytes[i];
  if (header_len > kMaxHeader) fail(path, "header length " + std::to_string(header_len) + " exceeds 100 MB");
  if (header_len > size - 8) {
    fail(path, "truncated: header length " + std::to_string(header_len) + " runs past the end of the " +
                   std::to_string(size) + "-byte file");
  }
  json header;
  try {
    header = json::parse(bytes + 8, bytes + 8 + header_len);
  } catch (const json::exception& e) {
    fail(path, std::string("header is not valid JSON: ") + e.what());
  }
  if (!header.is_object()) fail(path, "header is not a JSON object");
  f.data_ = bytes + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") {
      if (!it.value().is_object()) fail(path, "__metadata__ is not an object");
      for (auto m = it.value().begin(); m != it.value().end(); ++m) {
        if (!m.value().is_string()) fail(path, "__metadata__." + m.key() + " is not a string");
        f.metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const json& e = it.value();
    const std::string where = "tensor '" + name + "'";
    if (!e.is_object()) fail(path, where + ": entry is not an object");
    if (!e.contains("dtype") || !e["dtype"].is_string()) fail(path, where + ": missing dtype");
    StTensorInfo t;
    t.name = name;
    if (!parse_dtype(e["dtype"].get<std::string>(), &t.dtype)) {
      fail(path, where + ": unknown dtype '" + e["dtype"].get<std::string>() + "'");
    }
    if (!e.contains("shape") || !e["shape"].is_array()) fail(path, where + ": missing shape");
    uint64_t numel = 1;
    for (const json& d : e["shape"]) {
      if (!d.is_number_integer() || d.get<int64_t>() < 0) fail(path, where + ": shape has a negative or non-integer dimension");
      const uint64_t dim = d.get<uint64_t>();
      if (dim != 0 && numel > std::numeric_limits<uint64_t>::max() / dim) fail(path, where + ": shape overflows");
      numel *= dim;
      t.shape.push_back(static_cast<int64_t>(dim));
    }
    const json& off = e.contains("data_offsets") ? e["data_offsets"] : json();
    if (!off.is_array() || off.size() != 2 || !off[0].is_number_unsigned() || !off[1].is_number_unsigned()) {
      fail(path, where + ": data_offsets must be two non-negative integers");
    }
    t.begin = off[0].get<uint64_t>();
    t.end = off[1].get<uint64_t>();
    if (t.begin > t.end || t.end > data_size) {
      fail(path, where + ": data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                     "] out of range of the " + std::to_string(data_size) + "-byte data section");
    }
    const uint64_t width = dtype_size(t.dtype);
    if (numel > std::numeric_limits<uint64_t>::max() / width || t.end - t.begin != numel * width) {
      fail(path, where + ": " + std::to_string(t.end - t.begin) + " bytes but shape and dtype need " +
                     std::to_string(numel * width));
    }
    f.index_[name] = f.tensors_.size();
    f.tensors_.push_back(std::move(t));
  }
  // Tensors may not overlap.
  std::vector<const StTensorInfo*> by_offset;
  for (const auto& t : f.tensors_) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(), [](const StTensorInfo* a, const StTensorInfo* b) {
    return a->begin < b->begin || (a->begin == b->begin && a->end < b->end);
  });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i]->begin < by_offset[i - 1]->end) {
      fail(path, "tensors '" + by_offset[i - 1]->name + "' and '" + by_offset[i]->name + "' overlap");
    }
  }
  return f;
}

const StTensorInfo* SafetensorsFile::find(const std::string& name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

Checkpoint Checkpoint::open(const std::string& path) {
  namespace fs = std::filesystem;
  Checkpoint c;
  if (fs::path(path).extension() == ".json") {
    std::string text;
    try {
      text = fsx::InputFile(path).read_all(int64_t{256} << 20);
    } catch (const fsx::FsError& e) {
      throw IoError(std::string("cannot open the checkpoint index: ") + e.what());
    }
    json index;
    try {
      index = json::parse(text);
    } catch (const json::exception& e) {
      fail(path, std::string("index is not valid JSON: ") + e.what());
    }
    if (!index.contains("weight_map") || !index["weight_map"].is_object()) fail(path, "index has no weight_map object");
    std::map<std::string, size_t> shard_of_file;
    const fs::path dir = fs::path(path).parent_path();
    for (auto it = index["weight_map"].begin(); it != index["weight_map"].end(); ++it) {
      if (!it.value().is_string()) fail(path, "weight_map['" + it.key() + "'] is not a file name");
      const std::string file = it.value().get<std::string>();
      if (file.find('/') != std::string::npos || file == ".." ) fail(path, "weight_map['" + it.key() + "']: shard '" + file + "' must be a file in the index's folder");
      auto s = shard_of_file.find(file);
      if (s == shard_of_file.end()) {
        c.files_.push_back(std::make_unique<SafetensorsFile>(SafetensorsFile::open((dir / file).string())));
        s = shard_of_file.emplace(file, c.files_.size() - 1).first;
      }
      const StTensorInfo* t = c.files_[s->second]->find(it.key());
      if (t == nullptr) fail(path, "weight_map names '" + it.key() + "' in " + file + ", which does not hold it");
      c.where_[it.key()] = {s->second, t};
    }
  } else {
    c.files_.push_back(std::make_unique<SafetensorsFile>(SafetensorsFile::open(path)));
    for (const auto& t : c.files_[0]->tensors()) c.where_[t.name] = {0, &t};
  }
  return c;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> n;
  for (const auto& [name, w] : where_) n.push_back(name);
  return n;
}

std::pair<const SafetensorsFile*, const StTensorInfo*> Checkpoint::find(const std::string& name) const {
  const auto it = where_.find(name);
  if (it == where_.end()) return {nullptr, nullptr};
  return {files_[it->second.first].get(), it->second.second};
}

namespace {

// A file written to path + ".tmp" and renamed over path on commit(); removed if the
// writer fails or is destroyed first.
class AtomicFile {
 public:
  // Outputs go through fsx: beneath the job's output folder, never through a link. Their
  // failures are fsx::OutputError (a system fault: disk full, I/O), not bad input.
  explicit AtomicFile(std::string path) : path_(std::move(path)), tmp_(path_ + ".tmp") {
    fd_ = fsx::open_output(tmp_, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  }
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;
  ~AtomicFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) {
      try {
        fsx::remove_output_tree(tmp_);
      } catch (const fsx::FsError&) {
      }
    }
  }
  void write(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      const ssize_t w = ::write(fd_, p, n);
      if (w < 0) {
        if (errno == EINTR) continue;
        throw fsx::OutputError(tmp_ + ": write failed: " + std::strerror(errno), errno);
      }
      p += w;
      n -= static_cast<size_t>(w);
    }
  }
  void commit() {
    if (::fsync(fd_) != 0) throw fsx::OutputError(tmp_ + ": cannot flush: " + std::strerror(errno), errno);
    const int rc = ::close(fd_);
    fd_ = -1;
    if (rc != 0) throw fsx::OutputError(tmp_ + ": cannot write: " + std::strerror(errno), errno);
    fsx::rename_output(tmp_, path_);
    committed_ = true;
  }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
  bool committed_ = false;
};

}  // namespace

void write_file_atomic(const std::string& path, const std::string& contents) {
  AtomicFile f(path);
  f.write(contents.data(), contents.size());
  f.commit();
}

void write_safetensors(const std::string& path, const std::vector<StTensorView>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    uint64_t numel = 1;
    for (int64_t d : t.shape) {
      if (d < 0) fail(path, "tensor '" + t.name + "': negative dimension");
      numel *= static_cast<uint64_t>(d);
    }
    if (numel * dtype_size(t.dtype) != t.nbytes) {
      fail(path, "tensor '" + t.name + "': " + std::to_string(t.nbytes) + " bytes do not match its shape and dtype");
    }
    if (t.name == "__metadata__" || header.contains(t.name)) fail(path, "tensor '" + t.name + "' given twice or reserved");
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape},
                      {"data_offsets", {offset, offset + t.nbytes}}};
    offset += t.nbytes;
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h.push_back(' ');  // keep the data section 8-byte aligned
  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>((static_cast<uint64_t>(h.size()) >> (8 * i)) & 0xFF);
  AtomicFile f(path);
  f.write(len, 8);
  f.write(h.data(), h.size());
  for (const auto& t : tensors) f.write(t.data, t.nbytes);
  f.commit();
}

}  // namespace memfit::io
