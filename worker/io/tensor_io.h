// at::Tensor <-> safetensors files (LibTorch side of worker/io).
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

#include "safetensors.h"

namespace memfit::io {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// A copy of a tensor held in a mapped file, in its stored dtype.
at::Tensor to_tensor(const SafetensorsFile& f, const StTensorInfo& t);
NamedTensors read_tensors(const std::string& path);
// Writes CPU copies of the tensors atomically (float32/bf16/f16/int64/uint8/bool).
void write_tensors(const std::string& path, const NamedTensors& tensors,
                   const std::map<std::string, std::string>& metadata = {});

}  // namespace memfit::io
