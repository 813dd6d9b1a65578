// at::Tensor entry points of the attention ops (registered in ops.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <tuple>

#include "attention/attention_checks.h"

namespace cm3leon::attention {

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

// KV cache: appends k/v [B, Sn, Hkv, D] into k_cache/v_cache [B, L, Hkv, D] at cache_seqlens (int32 [B], or
// the scalar cache_seqlen for every row when absent), then attends q [B, Sq, Hq, D] to the valid prefix.
OutLse kvcache_cpu_launch(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                          const c10::optional<Tensor>& k, const c10::optional<Tensor>& v,
                          const c10::optional<Tensor>& cache_seqlens, int64_t cache_seqlen,
                          double softmax_scale, bool causal);

}  // namespace cm3leon::attention
