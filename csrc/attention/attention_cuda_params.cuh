// The call as every CUDA attention kernel sees it (torch-free, CuTe-free): AttnParams (forward, decode) and
// BackwardParams (AttnParams plus the backward's tensors), SeqInfo (where a batch row / document lives and
// which keys its queries see) and ScoreMod (softcap and ALiBi); see attention_cuda_traits.cuh for the overview.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/dtype.h"

namespace cm3leon::attention::cuda {

constexpr float kLog2e = 1.4426950408889634f;

#ifdef __CUDACC__
#define CM3LEON_HD __host__ __device__
#else
#define CM3LEON_HD
#endif

CM3LEON_HD inline int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// ---- the call -------------------------------------------------------------------------------------------
struct AttnParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  int64_t q_row_stride, k_row_stride;  // elements between consecutive tokens (= heads * head_dim)
  int64_t total_q, total_k;            // tokens in the q/out and k/v tensors (bounds for clamping)
  int batch, heads_q, heads_kv, head_dim;
  int seqlen_q, seqlen_k;       // dense: every row's lengths; varlen: the max lengths (grid size only)
  int64_t k_batch_tokens;       // dense / KV cache: tokens between batch rows of k/v (seqlen_k or capacity)
  const int32_t* cu_seqlens_q;  // varlen: [batch + 1] on the device, else nullptr
  const int32_t* cu_seqlens_k;
  const int32_t* cache_seqlens;  // KV cache: row b sees cache_seqlens[b] + cache_extra keys, else nullptr
  int cache_extra;
  int64_t lse_head_stride;  // dense: seqlen_q; varlen: total_q
  float scale;              // softmax_scale
  bool causal;              // bottom-right aligned: query i sees keys j <= i + k_len - q_len
  // FlashAttention's extras, as Problem in attention_cpu.h: the local window around the diagonal (-1: that
  // side unbounded), the tanh softcap (0: off), ALiBi slopes float32 [batch][heads_q] (batch stride 0: one
  // row for every batch row; null: off).
  int window_left = -1, window_right = -1;
  float softcap = 0.f;
  const float* alibi_slopes = nullptr;
  int alibi_batch_stride = 0;
};

// The backward: the forward's call (out is read, lse is the forward's) plus dO, the gradients and two fp32
// workspaces: dq_accum [total_q, heads_q, head_dim] (zeroed by the kernels), dsum [heads_q, total_q]
// (D = rowsum(dO * O)). Pointers to q, k, v, out, dout are 16-byte aligned (vector loads).
struct BackwardParams : AttnParams {
  DType dtype;
  const void* dout;
  void *dq, *dk, *dv;
  float *dq_accum, *dsum;
};

#ifdef __CUDACC__
struct SeqInfo {
  int64_t q_start, k_start, lse_start;
  int q_len, k_len;

  // Varlen offsets are clamped to the tensors: inconsistent cu_seqlens (not re-validated on the device, that
  // would need a host sync) cannot address memory outside q/k.
  __device__ SeqInfo(const AttnParams& p, int64_t b) {
    if (p.cu_seqlens_q != nullptr) {
      q_start = clamp64(p.cu_seqlens_q[b], 0, p.total_q);
      q_len = int(clamp64(p.cu_seqlens_q[b + 1], q_start, p.total_q) - q_start);
      k_start = clamp64(p.cu_seqlens_k[b], 0, p.total_k);
      k_len = int(clamp64(p.cu_seqlens_k[b + 1], k_start, p.total_k) - k_start);
      lse_start = q_start;
    } else {
      q_start = b * p.seqlen_q;
      q_len = p.seqlen_q;
      k_start = b * p.k_batch_tokens;
      k_len = p.cache_seqlens != nullptr
                  ? int(clamp64(int64_t(p.cache_seqlens[b]) + p.cache_extra, 0, p.k_batch_tokens))
                  : p.seqlen_k;
      lse_start = b * p.heads_q * p.seqlen_q;
    }
  }

  // Keys visible to query row i without a window: [0, visible_keys(i)).
  __device__ int visible_keys(int i, bool causal) const {
    if (!causal) return k_len;
    const int64_t last = int64_t(i) + k_len - q_len + 1;
    return int(last < 0 ? 0 : (last > k_len ? k_len : last));
  }

  // With the window: query i sees keys [key_lo(i), key_hi(i)) (none when key_hi <= key_lo); its diagonal is
  // i + k_len - q_len, causal tightens window_right to 0. Both bounds grow with i, so the queries that see
  // some key of [j0, j1) are [first_query(j0), end_query(j1)).
  __device__ int key_lo(int i, const AttnParams& p) const {
    return p.window_left < 0 ? 0 : int(clamp64(int64_t(i) + k_len - q_len - p.window_left, 0, k_len));
  }
  __device__ int key_hi(int i, const AttnParams& p) const {
    const int right = p.causal ? 0 : p.window_right;
    return right < 0 ? k_len : int(clamp64(int64_t(i) + k_len - q_len + right + 1, 0, k_len));
  }
  __device__ int first_query(int j0, const AttnParams& p) const {
    const int right = p.causal ? 0 : p.window_right;
    return right < 0 ? 0 : int(clamp64(int64_t(j0) - (k_len - q_len) - right, 0, q_len));
  }
  __device__ int end_query(int j1, const AttnParams& p) const {
    return p.window_left < 0 ? q_len : int(clamp64(int64_t(j1) - (k_len - q_len) + p.window_left, 0, q_len));
  }
  __device__ bool visible(int i, int j, const AttnParams& p) const {
    return i < q_len && j >= key_lo(i, p) && j < key_hi(i, p);
  }
};

// A raw score q.k to the score the softmax takes (natural units): times the softmax scale, through the
// softcap, minus the ALiBi bias slope * |diagonal - key|, for one (batch row / document, query head).
struct ScoreMod {
  float mul, cap, slope;  // cap = softcap (0: off), slope = ALiBi slope (0: off)

  __device__ ScoreMod(const AttnParams& p, int64_t b, int h)
      : mul(p.softcap > 0.f ? p.scale / p.softcap : p.scale),
        cap(p.softcap),
        slope(p.alibi_slopes ? p.alibi_slopes[b * p.alibi_batch_stride + h] : 0.f) {}

  // dist = query i's diagonal minus the key index. grad receives d(score) / d(scale q.k) through the cap.
  __device__ float operator()(float dot, int64_t dist, float* grad = nullptr) const {
    float s = dot * mul;
    if (cap > 0.f) {
      const float t = tanhf(s);
      if (grad) *grad = 1.f - t * t;
      s = cap * t;
    } else if (grad) {
      *grad = 1.f;
    }
    return s - slope * fabsf(float(dist));
  }
};

// e^(x - ref) for a score x and its row's max or lse (natural units). The difference is taken before the
// change of base, so x == ref gives exactly 1: a row's only key gets P = 1 in the forward and, from the saved
// lse, in the backward (an lse converted to base 2 and back would not round-trip).
__device__ inline float exp_diff(float x, float ref) { return exp2f((x - ref) * kLog2e); }
#endif  // __CUDACC__

#undef CM3LEON_HD

}  // namespace cm3leon::attention::cuda
