// Built only with MEMFIT_CUDA=ON against a CUDA LibTorch.
#include "dispatch_cuda.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <stdexcept>

namespace memfit::ops::detail {

void run_on_cuda(const at::Tensor& t, const std::function<void(void* stream)>& launch) {
  const c10::cuda::CUDAGuard guard(t.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream(t.device().index()).stream();
  try {
    launch(static_cast<void*>(stream));
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

}  // namespace memfit::ops::detail
