// CUDA bodies of the attention row kernels (kernels/attention_rows.h): one block per
// row, grid-stride over rows; every thread takes part in each reduction.
#include <cfloat>

#include "cuda/common.cuh"
#include "kernels/attention_rows.h"

namespace memfit::kernels {
namespace {

constexpr int kRowThreads = 256;

__device__ __forceinline__ float warp_max(float v) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  return v;
}
__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}
template <bool kMax>
__device__ float block_reduce(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  float t = lane < nwarps ? scratch[lane] : (kMax ? -INFINITY : 0.0f);
  return kMax ? warp_max(t) : warp_sum(t);
}

__device__ __forceinline__ int64_t row_limit(const AttentionRows& g, int64_t r) {
  if (!g.causal) return g.len;
  const int64_t lim = g.causal_base + r % g.chunk;
  return lim < 0 ? 0 : (lim > g.len ? g.len : lim);
}
__device__ __forceinline__ const uint8_t* row_mask(const AttentionRows& g, int64_t r) {
  return g.key_mask ? g.key_mask + (r / g.rows_per_batch) * g.key_mask_ld : nullptr;
}

__global__ void softmax_forward_kernel(AttentionRows g, float* s, float* lse) {
  __shared__ float scratch[32];
  for (int64_t r = blockIdx.x; r < g.rows; r += gridDim.x) {
    float* row = s + r * g.ld;
    const int64_t lim = row_limit(g, r);
    const uint8_t* mask = row_mask(g, r);
    float m = -INFINITY;
    for (int64_t j = threadIdx.x; j < lim; j += blockDim.x) {
      if (!mask || mask[j]) m = fmaxf(m, row[j]);
    }
    m = block_reduce<true>(m, scratch);
    float sum = 0.0f;
    for (int64_t j = threadIdx.x; j < g.len; j += blockDim.x) {
      const bool vis = m != -INFINITY && j < lim && (!mask || mask[j]);
      const float e = vis ? __expf(row[j] - m) : 0.0f;
      row[j] = e;
      sum += e;
    }
    sum = block_reduce<false>(sum, scratch);
    const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
    for (int64_t j = threadIdx.x; j < lim; j += blockDim.x) row[j] *= inv;
    if (threadIdx.x == 0) lse[r] = sum > 0.0f ? m + logf(sum) : -INFINITY;
  }
}

__global__ void probs_kernel(AttentionRows g, float* s, const float* lse) {
  for (int64_t r = blockIdx.x; r < g.rows; r += gridDim.x) {
    float* row = s + r * g.ld;
    const float l = lse[r];
    const int64_t lim = row_limit(g, r);
    const uint8_t* mask = row_mask(g, r);
    for (int64_t j = threadIdx.x; j < g.len; j += blockDim.x) {
      const bool vis = l != -INFINITY && j < lim && (!mask || mask[j]);
      row[j] = vis ? __expf(row[j] - l) : 0.0f;
    }
  }
}

__global__ void dscores_kernel(AttentionRows g, float* dp, const float* p, const float* delta) {
  for (int64_t r = blockIdx.x; r < g.rows; r += gridDim.x) {
    float* drow = dp + r * g.ld;
    const float* prow = p + r * g.ld;
    const float dl = delta[r];
    const int64_t lim = row_limit(g, r);
    for (int64_t j = threadIdx.x; j < g.len; j += blockDim.x) {
      drow[j] = j < lim ? prow[j] * (drow[j] - dl) : 0.0f;
    }
  }
}

unsigned int row_blocks(int64_t rows) {
  return static_cast<unsigned int>(rows < 1 ? 1 : (rows > 262144 ? 262144 : rows));
}

}  // namespace

void attention_softmax_forward_cuda(const AttentionRows& g, float* s, float* lse, StreamHandle stream) {
  if (g.rows <= 0) return;
  softmax_forward_kernel<<<row_blocks(g.rows), kRowThreads, 0, cuda::as_stream(stream)>>>(g, s, lse);
  cuda::check_launch("attention_softmax_forward");
}

void attention_probs_cuda(const AttentionRows& g, float* s, const float* lse, StreamHandle stream) {
  if (g.rows <= 0) return;
  probs_kernel<<<row_blocks(g.rows), kRowThreads, 0, cuda::as_stream(stream)>>>(g, s, lse);
  cuda::check_launch("attention_probs");
}

void attention_dscores_cuda(const AttentionRows& g, float* dp, const float* p, const float* delta,
                            StreamHandle stream) {
  if (g.rows <= 0) return;
  dscores_kernel<<<row_blocks(g.rows), kRowThreads, 0, cuda::as_stream(stream)>>>(g, dp, p, delta);
  cuda::check_launch("attention_dscores");
}

}  // namespace memfit::kernels
