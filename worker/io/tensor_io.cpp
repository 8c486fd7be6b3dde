#include "tensor_io.h"

#include <ATen/ATen.h>

namespace memfit::io {
namespace {

at::ScalarType scalar_of(StDType t) {
  switch (t) {
    case StDType::kF64: return at::kDouble;
    case StDType::kF32: return at::kFloat;
    case StDType::kF16: return at::kHalf;
    case StDType::kBF16: return at::kBFloat16;
    case StDType::kI64: return at::kLong;
    case StDType::kI32: return at::kInt;
    case StDType::kI16: return at::kShort;
    case StDType::kI8: return at::kChar;
    case StDType::kU8: return at::kByte;
    case StDType::kBool: return at::kBool;
  }
  return at::kFloat;
}

StDType st_of(at::ScalarType t, const std::string& name) {
  switch (t) {
    case at::kDouble: return StDType::kF64;
    case at::kFloat: return StDType::kF32;
    case at::kHalf: return StDType::kF16;
    case at::kBFloat16: return StDType::kBF16;
    case at::kLong: return StDType::kI64;
    case at::kInt: return StDType::kI32;
    case at::kShort: return StDType::kI16;
    case at::kChar: return StDType::kI8;
    case at::kByte: return StDType::kU8;
    case at::kBool: return StDType::kBool;
    default: throw IoError("tensor '" + name + "': dtype cannot be stored in safetensors");
  }
}

}  // namespace

at::Tensor to_tensor(const SafetensorsFile& f, const StTensorInfo& t) {
  return at::from_blob(const_cast<uint8_t*>(f.data(t)), t.shape, at::TensorOptions().dtype(scalar_of(t.dtype))).clone();
}

NamedTensors read_tensors(const std::string& path) {
  const SafetensorsFile f = SafetensorsFile::open(path);
  NamedTensors out;
  for (const auto& t : f.tensors()) out.emplace_back(t.name, to_tensor(f, t));
  return out;
}

void write_tensors(const std::string& path, const NamedTensors& tensors,
                   const std::map<std::string, std::string>& metadata) {
  std::vector<at::Tensor> keep;
  std::vector<StTensorView> views;
  for (const auto& [name, t] : tensors) {
    at::Tensor c = t.detach().to(at::kCPU).contiguous();
    keep.push_back(c);
    StTensorView v;
    v.name = name;
    v.dtype = st_of(c.scalar_type(), name);
    v.shape = c.sizes().vec();
    v.data = c.data_ptr();
    v.nbytes = c.nbytes();
    views.push_back(v);
  }
  write_safetensors(path, views, metadata);
}

}  // namespace memfit::io
