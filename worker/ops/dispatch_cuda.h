// CUDA side of the dispatch (MEMFIT_CUDA builds only): runs a kernel launcher on the
// tensor's device and current stream, and turns a launch error into a c10::Error.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>

namespace memfit::ops::detail {

void run_on_cuda(const at::Tensor& t, const std::function<void(void* stream)>& launch);

}  // namespace memfit::ops::detail
