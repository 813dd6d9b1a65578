// The float32 forward on CUDA cores: the slow path that keeps the dtype contract on every device (no tensor
// cores, no K/V reuse through shared memory). Torch-free.
//
// One warp per query row. Scores go 32 keys at a time, one key per lane (a full dot product against q held
// in shared memory, then ScoreMod); the online softmax works on the warp's 32 scores; P V
// runs over the head dim, lane e accumulating output columns e, e + 32, ... (coalesced V reads).
#pragma once
#include "attention/attention_cuda_params.cuh"

namespace cm3leon::attention::cuda {

constexpr int kSimtWarps = 4;  // query rows per block

__device__ __forceinline__ float warp_max(float x) {
  for (int off = 16; off > 0; off /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Grid: (ceil(seqlen_q / kSimtWarps), batch, heads_q); rows past the grid are covered by striding.
__global__ void __launch_bounds__(kSimtWarps * 32) forward_simt_kernel(const AttnParams p) {
  constexpr int kMaxDim = 256, kCols = kMaxDim / 32;
  __shared__ __align__(16) float q_smem[kSimtWarps][kMaxDim];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const SeqInfo s(p, blockIdx.y);
  const int h = blockIdx.z, d = p.head_dim;
  const ScoreMod mod(p, blockIdx.y, h);
  const int64_t kv_offset = s.k_start * p.k_row_stride + int64_t(h / (p.heads_q / p.heads_kv)) * d;
  const float* kb = static_cast<const float*>(p.k) + kv_offset;
  const float* vb = static_cast<const float*>(p.v) + kv_offset;
  float* qs = q_smem[warp];

  for (int i = blockIdx.x * kSimtWarps + warp; i < s.q_len; i += gridDim.x * kSimtWarps) {
    const int64_t row_offset = (s.q_start + i) * p.q_row_stride + int64_t(h) * d;
    const float* qrow = static_cast<const float*>(p.q) + row_offset;
    __syncwarp();  // the previous row's reads of qs are done
    for (int e = lane; e < d; e += 32) qs[e] = qrow[e];
    __syncwarp();

    const int lo = s.key_lo(i, p), hi = s.key_hi(i, p);
    const int64_t diag = int64_t(i) + s.k_len - s.q_len;
    float m = -INFINITY, l = 0.f, acc[kCols];
#pragma unroll
    for (int t = 0; t < kCols; ++t) acc[t] = 0.f;
    for (int j0 = lo; j0 < hi; j0 += 32) {  // j0 < hi: lane 0's key is visible, so the chunk max is finite
      const int j = j0 + lane;
      float score = -INFINITY;
      if (j < hi) {
        const float4* kr = reinterpret_cast<const float4*>(kb + int64_t(j) * p.k_row_stride);
        const float4* q4 = reinterpret_cast<const float4*>(qs);
        float dot = 0.f;
        for (int e = 0; e < d / 4; ++e) {
          const float4 a = kr[e], b = q4[e];
          dot += a.x * b.x + a.y * b.y + a.z * b.z + a.w * b.w;
        }
        score = mod(dot, diag - j);
      }
      const float m_new = fmaxf(m, warp_max(score));
      const float rescale = exp_diff(m, m_new);
      const float prob = exp_diff(score, m_new);
      l = l * rescale + warp_sum(prob);
      m = m_new;
#pragma unroll
      for (int t = 0; t < kCols; ++t) acc[t] *= rescale;
      const int count = min(32, hi - j0);
      for (int jj = 0; jj < count; ++jj) {
        const float pj = __shfl_sync(0xffffffffu, prob, jj);
        const float* vr = vb + int64_t(j0 + jj) * p.k_row_stride;
#pragma unroll
        for (int t = 0; t < kCols; ++t) {
          if (lane + 32 * t < d) acc[t] += pj * vr[lane + 32 * t];
        }
      }
    }

    const float inv = l == 0.f ? 0.f : 1.f / l;  // l == 0: no visible key; NaN l: NaN row, as PyTorch
    float* orow = static_cast<float*>(p.out) + row_offset;
#pragma unroll
    for (int t = 0; t < kCols; ++t) {
      if (lane + 32 * t < d) orow[lane + 32 * t] = acc[t] * inv;
    }
    if (lane == 0)
      p.lse[s.lse_start + int64_t(h) * p.lse_head_stride + i] = l == 0.f ? -INFINITY : m + logf(l);
  }
}

}  // namespace cm3leon::attention::cuda
