// Element types the memfit kernels accept, shared by the CPU and CUDA bodies.
// Kept free of torch and CUDA headers so that .cu files can include it.
#pragma once

#include <cstdint>

namespace memfit::kernels {

// Storage type of the floating tensors a kernel reads and writes. Kernels compute in
// fp32 whatever the storage type is.
enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kFloat32: return "float32";
    case DType::kBFloat16: return "bfloat16";
    case DType::kFloat16: return "float16";
  }
  return "unknown";
}

// CUDA launchers take the stream as an opaque pointer (a cudaStream_t) so that this
// header and the ones that include it need no CUDA headers.
using StreamHandle = void*;

}  // namespace memfit::kernels
