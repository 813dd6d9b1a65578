// The call as every CUDA attention kernel sees it (torch-free, CuTe-free): AttnParams and SeqInfo, see
// attention_cuda_traits.cuh for the overview.
#pragma once
#include <cmath>
#include <cstdint>

namespace cm3leon::attention::cuda {

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
  float scale_log2;         // softmax_scale * log2(e)
  bool causal;              // bottom-right aligned: query i sees keys j <= i + k_len - q_len
};

#ifdef __CUDACC__
struct SeqInfo {
  int64_t q_start, k_start, lse_start;
  int q_len, k_len;

  __device__ SeqInfo(const AttnParams& p, int b) {
    if (p.cu_seqlens_q != nullptr) {
      q_start = clamp64(p.cu_seqlens_q[b], 0, p.total_q);
      q_len = int(clamp64(p.cu_seqlens_q[b + 1], q_start, p.total_q) - q_start);
      k_start = clamp64(p.cu_seqlens_k[b], 0, p.total_k);
      k_len = int(clamp64(p.cu_seqlens_k[b + 1], k_start, p.total_k) - k_start);
      lse_start = q_start;
    } else {
      q_start = int64_t(b) * p.seqlen_q;
      q_len = p.seqlen_q;
      k_start = int64_t(b) * p.k_batch_tokens;
      k_len = p.cache_seqlens != nullptr
                  ? int(clamp64(int64_t(p.cache_seqlens[b]) + p.cache_extra, 0, p.k_batch_tokens))
                  : p.seqlen_k;
      lse_start = int64_t(b) * p.heads_q * p.seqlen_q;
    }
  }

  // Keys visible to query row i: [0, visible_keys(i)).
  __device__ int visible_keys(int i, bool causal) const {
    if (!causal) return k_len;
    const int64_t last = int64_t(i) + k_len - q_len + 1;
    return int(last < 0 ? 0 : (last > k_len ? k_len : last));
  }

 private:
  __device__ static int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }
};
#endif  // __CUDACC__

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

}  // namespace cm3leon::attention::cuda
