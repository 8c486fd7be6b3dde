// MS-BP normalization without affine parameters (shared/docs/method.md section 2).
//
// Both norms act on the last dimension: a tensor is seen as [rows, cols].
//   LayerNorm: r = 1 / sqrt(var(x) + eps) (biased variance), y = (x - mean(x)) * r
//   RMSNorm:   r = 1 / sqrt(mean(x^2) + eps),                y = x * r
// Forward keeps y and r only. Backward, with g = dL/dy and means over a row:
//   LayerNorm: dx = r * (g - mean(g) - y * mean(g * y))
//   RMSNorm:   dx = r * (g - y * mean(g * y))
// Both gradients are exact (they use y, which is what forward returns).
// Row statistics are two-pass (mean, then the sum of squared differences): in double on
// CPU; on CUDA in fp32 with every value shifted by the row's first element and, when
// some |x - shift| >= 2^32, scaled by a power of two before squaring. So a constant row
// has variance exactly 0 (LayerNorm gives y = 0 even at eps 1e-12) and rows up to
// |x| ~ 1e37 neither overflow nor lose their variance. Accumulators are per-row locals:
// the kernels allocate nothing.
#pragma once

#include <cstdint>

#include "kernels/dtype.h"

namespace memfit::kernels {

enum class NormKind : int32_t { kLayerNorm = 0, kRMSNorm = 1 };

// x: [rows, cols] contiguous -> y: [rows, cols] (x's dtype), rstd: [rows] fp32.
void ms_norm_forward_cpu(NormKind kind, DType dt, const void* x, void* y, float* rstd,
                         int64_t rows, int64_t cols, float eps);
// dy: [rows, cols], y: [rows, cols], rstd: [rows] -> dx: [rows, cols] (dy's dtype).
void ms_norm_backward_cpu(NormKind kind, DType dt, const void* dy, const void* y,
                          const float* rstd, void* dx, int64_t rows, int64_t cols);

void ms_norm_forward_cuda(NormKind kind, DType dt, const void* x, void* y, float* rstd,
                          int64_t rows, int64_t cols, float eps, StreamHandle stream);
void ms_norm_backward_cuda(NormKind kind, DType dt, const void* dy, const void* y,
                           const float* rstd, void* dx, int64_t rows, int64_t cols,
                           StreamHandle stream);

}  // namespace memfit::kernels
