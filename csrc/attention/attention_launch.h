// at::Tensor entry points of the attention ops on both backends (registered in ops.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>
#include <tuple>

#include "attention/attention_checks.h"

namespace cm3leon::attention {

// The flash_attn_kvcache schema's arguments, as every KV-cache launcher (CPU and CUDA) takes them.
#define CM3LEON_KVCACHE_PARAMS                                                                              \
  const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,                                 \
      const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,                                \
      const std::optional<at::Tensor>& cache_seqlens, int64_t cache_seqlen, double softmax_scale, bool causal, \
      int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes, \
      const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin,              \
      bool rotary_interleaved, const std::optional<at::Tensor>& cache_batch_idx,                             \
      const std::optional<at::Tensor>& cache_leftpad, const std::optional<at::Tensor>& block_table,          \
      int64_t num_splits

using Tensor = at::Tensor;
using OutLse = std::tuple<Tensor, Tensor>;          // (out, lse float32)
using Grads = std::tuple<Tensor, Tensor, Tensor>;   // (dq, dk, dv)

// q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> (out [B, Sq, Hq, D], lse [B, Hq, Sq]).
OutLse forward_cpu_launch(const Tensor& q, const Tensor& k, const Tensor& v, double softmax_scale,
                          bool causal, CM3LEON_ATTN_EXTRA_PARAMS);
Grads backward_cpu_launch(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                          const Tensor& out, const Tensor& lse, double softmax_scale, bool causal,
                          CM3LEON_ATTN_EXTRA_PARAMS);

// Packed documents: q [Tq, Hq, D], k/v [Tk, Hkv, D], int32 cu_seqlens -> (out, lse [Hq, Tq]).
OutLse varlen_forward_cpu_launch(const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                 int64_t max_seqlen_k, double softmax_scale, bool causal,
                                 CM3LEON_ATTN_EXTRA_PARAMS);
Grads varlen_backward_cpu_launch(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Tensor& out, const Tensor& lse, const Tensor& cu_seqlens_q,
                                 const Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                 double softmax_scale, bool causal, CM3LEON_ATTN_EXTRA_PARAMS);

// The dropout keep mask bool [batch, nheads, seqlen_q, seqlen_k] of (dropout_seed, dropout_p), element
// (b, h, i, j) as the kernels decide it for query i and key j of batch row (varlen: document) b.
Tensor dropout_mask_cpu_launch(const Tensor& dropout_seed, int64_t batch, int64_t nheads, int64_t seqlen_q,
                               int64_t seqlen_k, double dropout_p);

// KV cache (attention_kvcache_launch.cpp): appends k/v [B, Sn, Hkv, D] (k rotated when rotary_cos/sin are
// given) into k_cache/v_cache at cache_seqlens (int32 [B], or the scalar cache_seqlen for every row when absent),
// then attends q [B, Sq, Hq, D] (rotated into a copy) to positions [cache_leftpad, cache_seqlens + Sn) of each
// row. The cache is [B_cache, L, Hkv, D] with row cache_batch_idx[b] (default b) serving q row b, or paged:
// [num_blocks, page, Hkv, D] read through block_table [B, blocks_per_row]. docs/attention.md.
OutLse kvcache_cpu_launch(CM3LEON_KVCACHE_PARAMS);

#ifdef CM3LEON_WITH_CUDA
// The same ops on CUDA tensors: forward and KV cache in attention_cuda_launch.cpp, backward in
// attention_backward_cuda_launch.cpp. cu_seqlens and cache_seqlens tensors live on the GPU and are not read
// back (no host sync): out-of-range values are clamped by the kernels, never dereferenced out of bounds, but
// not reported; an int cache_seqlen is checked on the host.
OutLse forward_cuda_launch(const Tensor& q, const Tensor& k, const Tensor& v, double softmax_scale, bool causal,
                           CM3LEON_ATTN_EXTRA_PARAMS);
Grads backward_cuda_launch(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                           const Tensor& out, const Tensor& lse, double softmax_scale, bool causal,
                           CM3LEON_ATTN_EXTRA_PARAMS);
OutLse varlen_forward_cuda_launch(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_seqlens_q,
                                  const Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                  double softmax_scale, bool causal, CM3LEON_ATTN_EXTRA_PARAMS);
Grads varlen_backward_cuda_launch(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& out, const Tensor& lse, const Tensor& cu_seqlens_q,
                                  const Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                  double softmax_scale, bool causal, CM3LEON_ATTN_EXTRA_PARAMS);
OutLse kvcache_cuda_launch(CM3LEON_KVCACHE_PARAMS);
#endif

}  // namespace cm3leon::attention
