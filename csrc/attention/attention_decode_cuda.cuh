// Split-KV decode for short queries against a KV cache (q length 1, or a few rows per kv head), and the
// in-place append of new keys/values. Torch-free, CuTe-free: the work is a bandwidth-bound stream over the
// cache, done with 16-byte vector loads.
//
// decode_split_kernel, grid (splits, heads_kv, batch), 128 threads: one block owns every query row of one kv
// head (the GQA group times the q length, at most ROWS), so each K/V row is read once for all of them. The
// row's valid keys [0, k_len) are cut into `splits` equal ranges; in a block, TPK threads share one key (each
// holds 16-byte slices of the head dim) and the 128 / TPK key slots keep their own online softmax, merged at
// the end through shared memory in a fixed order (deterministic). With one split the result is final;
// otherwise each split writes a partial (out normalised by its own sum, and its lse) to the workspace and
// decode_merge_kernel combines them by lse. Keys are read through a KvLayout (contiguous rows picked by
// cache_batch_idx, or pages through a block table), from position cache_leftpad[b] on.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention/attention_cuda_params.cuh"
#include "attention/attention_kvcache_cuda.h"

namespace cm3leon::attention::cuda {

constexpr int kDecodeThreads = 128, kDecodeUnroll = 4, kDecodeMaxDim = 256;

// 16 bytes of T <-> floats.
__device__ __forceinline__ void load16(const float* p, float* f) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  f[0] = v.x, f[1] = v.y, f[2] = v.z, f[3] = v.w;
}
__device__ __forceinline__ void load16(const __nv_bfloat16* p, float* f) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __bfloat1622float2(h[i]);
    f[2 * i] = x.x, f[2 * i + 1] = x.y;
  }
}
__device__ __forceinline__ void load16(const __half* p, float* f) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 x = __half22float2(h[i]);
    f[2 * i] = x.x, f[2 * i + 1] = x.y;
  }
}
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Index of partial result (split, b, h, i) in the workspace.
__device__ __forceinline__ int64_t partial_row(const AttnParams& p, int split, int b, int h, int i) {
  return ((int64_t(split) * p.batch + b) * p.heads_q + h) * p.seqlen_q + i;
}

template <typename T, int TPK, int NV, int ROWS>
__global__ void __launch_bounds__(kDecodeThreads) decode_split_kernel(const AttnParams p, const KvLayout lay,
                                                                      int num_splits, float* ws_out, float* ws_lse) {
  constexpr int VE = 16 / int(sizeof(T)), kDims = NV * VE, kSlots = kDecodeThreads / TPK;
  static_assert(TPK <= 32 && kDecodeThreads % TPK == 0);
  __shared__ __align__(16) float q_smem[ROWS][kDecodeMaxDim];
  __shared__ float acc_smem[ROWS][kDecodeMaxDim];
  __shared__ float max_smem[kSlots][ROWS];
  __shared__ float sum_smem[ROWS];

  const int split = blockIdx.x, hk = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
  const int slot = tid / TPK, sub = tid % TPK;
  // The row's visible keys are cache positions [lp, cache_seqlens[b] + new): key j is position lp + j, and the
  // diagonal, window and ALiBi distances count over them.
  SeqInfo s(p, b);
  const int lp = lay.leftpad(b, s.k_len);
  s.k_len -= lp;
  const int group = p.heads_q / p.heads_kv, sq = s.q_len, rows = group * sq, d = p.head_dim, k_len = s.k_len;

  // Query rows r = g * sq + i (q head hk * group + g, position i) to smem (raw: ScoreMod scales the dots);
  // clear the merge buffers.
  for (int idx = tid; idx < ROWS * kDecodeMaxDim; idx += kDecodeThreads) {
    const int r = idx / kDecodeMaxDim, e = idx % kDecodeMaxDim;
    float qv = 0.f;
    if (r < rows && e < d) {
      const int g = r / sq, i = r % sq;
      qv = to_float(static_cast<const T*>(p.q)[(s.q_start + i) * p.q_row_stride + int64_t(hk * group + g) * d + e]);
    }
    q_smem[r][e] = qv;
    acc_smem[r][e] = 0.f;
  }
  if (tid < ROWS) sum_smem[tid] = 0.f;
  __syncthreads();

  const int chunk = (k_len + num_splits - 1) / num_splits;
  int k_begin = min(k_len, split * chunk), k_end = min(k_len, k_begin + chunk);
  int lo[ROWS], hi[ROWS];
  float m[ROWS], l[ROWS], acc[ROWS][kDims];
  int lo_all = k_end, hi_all = k_begin;  // the keys some row sees (uniform over the block)
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    lo[r] = r < rows ? max(k_begin, s.key_lo(r % sq, p)) : 0;
    hi[r] = r < rows ? min(k_end, s.key_hi(r % sq, p)) : 0;
    if (lo[r] < hi[r]) lo_all = min(lo_all, lo[r]), hi_all = max(hi_all, hi[r]);
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int x = 0; x < kDims; ++x) acc[r][x] = 0.f;
  }
  k_begin = lo_all;  // a window's keys only: the rest of the slice is not read
  k_end = hi_all;
  const T* kb = static_cast<const T*>(p.k) + int64_t(hk) * d;
  const T* vb = static_cast<const T*>(p.v) + int64_t(hk) * d;

  // Trip count is uniform over the block (the shuffles below need every lane of a warp).
  for (int base = k_begin; base < k_end; base += kSlots * kDecodeUnroll) {
    float kf[kDecodeUnroll][kDims], vf[kDecodeUnroll][kDims];
#pragma unroll
    for (int u = 0; u < kDecodeUnroll; ++u) {
      const int j = base + u * kSlots + slot;
      const int64_t row = j < k_end ? lay.token(b, lp + j) * p.k_row_stride : 0;
#pragma unroll
      for (int n = 0; n < NV; ++n) {
        const int e0 = (sub + n * TPK) * VE;
        if (j < k_end && e0 < d) {
          load16(kb + row + e0, &kf[u][n * VE]);
          load16(vb + row + e0, &vf[u][n * VE]);
        } else {
#pragma unroll
          for (int x = 0; x < VE; ++x) kf[u][n * VE + x] = vf[u][n * VE + x] = 0.f;
        }
      }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (r >= rows) break;
      const ScoreMod mod(p, b, hk * group + r / sq);  // loop-invariant: the compiler keeps it in registers
      float score[kDecodeUnroll];
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) {
        float dot = 0.f;
#pragma unroll
        for (int n = 0; n < NV; ++n) {
          const int e0 = (sub + n * TPK) * VE;
          if (e0 < d) {
#pragma unroll
            for (int x = 0; x < VE; ++x) dot += q_smem[r][e0 + x] * kf[u][n * VE + x];
          }
        }
#pragma unroll
        for (int off = TPK / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        const int j = base + u * kSlots + slot;
        score[u] = j >= lo[r] && j < hi[r] ? mod(dot, r % sq + k_len - sq - j) : -INFINITY;
      }
      float mx = m[r];
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) mx = fmaxf(mx, score[u]);
      if (mx == -INFINITY) continue;  // nothing visible yet in this slot
      const float rescale = exp_diff(m[r], mx);
      m[r] = mx;
      l[r] *= rescale;
#pragma unroll
      for (int x = 0; x < kDims; ++x) acc[r][x] *= rescale;
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) {
        const float pu = exp_diff(score[u], mx);
        l[r] += pu;
#pragma unroll
        for (int x = 0; x < kDims; ++x) acc[r][x] += pu * vf[u][x];
      }
    }
  }

  // Merge the key slots: rescale each to the block max and add them into shared memory one slot at a time
  // (a fixed order, so results are reproducible run to run).
  if (sub == 0) {
#pragma unroll
    for (int r = 0; r < ROWS; ++r) max_smem[slot][r] = m[r];
  }
  __syncthreads();
  float weight[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    float block_max = -INFINITY;
    for (int t = 0; t < kSlots; ++t) block_max = fmaxf(block_max, max_smem[t][r]);
    weight[r] = m[r] == -INFINITY ? 0.f : exp_diff(m[r], block_max);
  }
  for (int t = 0; t < kSlots; ++t) {
    if (slot == t) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r >= rows || weight[r] == 0.f) continue;
#pragma unroll
        for (int n = 0; n < NV; ++n) {
          const int e0 = (sub + n * TPK) * VE;
          if (e0 < d) {
#pragma unroll
            for (int x = 0; x < VE; ++x) acc_smem[r][e0 + x] += acc[r][n * VE + x] * weight[r];
          }
        }
        if (sub == 0) sum_smem[r] += l[r] * weight[r];
      }
    }
    __syncthreads();
  }

  for (int idx = tid; idx < rows * d; idx += kDecodeThreads) {
    const int r = idx / d, e = idx % d, g = r / sq, i = r % sq, h = hk * group + g;
    float block_max = -INFINITY;
    for (int t = 0; t < kSlots; ++t) block_max = fmaxf(block_max, max_smem[t][r]);
    const float sum = sum_smem[r];
    // sum == 0: nothing visible; a NaN sum (NaN or inf inputs) makes the row NaN, as in PyTorch.
    const float value = sum == 0.f ? 0.f : acc_smem[r][e] / sum;
    const float lse = sum == 0.f ? -INFINITY : block_max + logf(sum);
    if (num_splits == 1) {
      static_cast<T*>(p.out)[(s.q_start + i) * p.q_row_stride + int64_t(h) * d + e] = from_float<T>(value);
      if (e == 0) p.lse[s.lse_start + int64_t(h) * p.lse_head_stride + i] = lse;
    } else {
      const int64_t row = partial_row(p, split, b, h, i);
      ws_out[row * d + e] = value;
      if (e == 0) ws_lse[row] = lse;
    }
  }
}

// One block per output row (b, h, i): out = sum_s w_s out_s / sum_s w_s with w_s = e^(lse_s - max lse)
// (exp_diff: the difference first, so the weight's error scales with it, not with |lse|; exp2f, not the
// fast-math __expf).
template <typename T>
__global__ void __launch_bounds__(kDecodeThreads) decode_merge_kernel(const AttnParams p, int num_splits,
                                                                      const float* ws_out, const float* ws_lse) {
  const int i = blockIdx.x % p.seqlen_q, h = (blockIdx.x / p.seqlen_q) % p.heads_q;
  const int b = blockIdx.x / (p.seqlen_q * p.heads_q), d = p.head_dim;
  float max_lse = -INFINITY;
  bool poisoned = false;  // a NaN partial (NaN or inf inputs) makes the row NaN; fmaxf alone would drop it
  for (int sp = 0; sp < num_splits; ++sp) {
    const float x = ws_lse[partial_row(p, sp, b, h, i)];
    poisoned |= isnan(x);
    max_lse = fmaxf(max_lse, x);
  }
  float total = poisoned ? NAN : 0.f;
  if (!poisoned && max_lse != -INFINITY) {
    for (int sp = 0; sp < num_splits; ++sp) total += exp_diff(ws_lse[partial_row(p, sp, b, h, i)], max_lse);
  }
  const float inv = total == 0.f ? 0.f : 1.f / total;
  const int64_t out_row = (int64_t(b) * p.seqlen_q + i) * p.q_row_stride + int64_t(h) * d;
  for (int e = threadIdx.x; e < d; e += blockDim.x) {
    float value = 0.f;
    if (total != 0.f) {
      for (int sp = 0; sp < num_splits; ++sp) {
        const int64_t row = partial_row(p, sp, b, h, i);
        const float w = exp_diff(ws_lse[row], max_lse);
        value += w * ws_out[row * d + e];
      }
    }
    static_cast<T*>(p.out)[out_row + e] = from_float<T>(value * inv);
  }
  if (threadIdx.x == 0) {
    p.lse[(int64_t(b) * p.heads_q + h) * p.seqlen_q + i] = total == 0.f ? -INFINITY : max_lse + logf(total);
  }
}

// Copies 16-byte chunks of new rows into the cache at positions cache_seqlens[b] + t of each row, through the
// layout (grid-stride).
__global__ void append_kv_kernel(const uint4* __restrict__ src, uint4* __restrict__ cache, int64_t batch,
                                 int64_t new_len, int64_t chunks_per_row, const int32_t* __restrict__ cache_seqlens,
                                 int32_t start_if_null, const KvLayout lay) {
  const int64_t total = batch * new_len * chunks_per_row;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = idx % chunks_per_row, t = (idx / chunks_per_row) % new_len;
    const int b = int(idx / (chunks_per_row * new_len));
    const int64_t pos = (cache_seqlens != nullptr ? int64_t(cache_seqlens[b]) : int64_t(start_if_null)) + t;
    if (pos < 0 || pos >= lay.capacity) continue;  // the launcher checks host-known positions; device ones are skipped
    cache[lay.token(b, pos) * chunks_per_row + c] = src[idx];
  }
}

// One element per thread (grid-stride): reads its rotation partner from src, so dst never aliases a value
// another thread still needs. See RotaryCall.
template <typename T>
__global__ void rotary_kernel(const RotaryCall r) {
  const T* src = static_cast<const T*>(r.src);
  const T* cos = static_cast<const T*>(r.cos);
  const T* sin = static_cast<const T*>(r.sin);
  const int64_t d = r.head_dim, half = r.rotary_dim / 2, total = r.batch * r.len * r.heads * d;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = idx % d, h = (idx / d) % r.heads, t = (idx / (d * r.heads)) % r.len;
    const int b = int(idx / (d * r.heads * r.len));
    const int64_t start = r.cache_seqlens != nullptr ? int64_t(r.cache_seqlens[b]) : int64_t(r.start_if_null);
    float y = to_float(src[idx]);
    if (e < r.rotary_dim) {
      int64_t pos = start + (r.per_token ? t : 0);
      pos = pos < 0 ? 0 : (pos >= r.seqlen_ro ? r.seqlen_ro - 1 : pos);
      const bool first = r.interleaved ? e % 2 == 0 : e < half;
      const int64_t i = r.interleaved ? e / 2 : e % half;
      const int64_t partner = r.interleaved ? (e ^ 1) : (first ? e + half : e - half);
      const float c = to_float(cos[pos * half + i]), s = to_float(sin[pos * half + i]);
      const float xp = to_float(src[idx - e + partner]);
      y = first ? y * c - xp * s : xp * s + y * c;
    }
    int64_t at = idx;
    if (r.into_cache) {
      const int64_t pos = start + t;
      if (pos < 0 || pos >= r.cache.capacity) continue;
      at = (r.cache.token(b, pos) * r.heads + h) * d + e;
    }
    static_cast<T*>(r.dst)[at] = from_float<T>(y);
  }
}

}  // namespace cm3leon::attention::cuda
