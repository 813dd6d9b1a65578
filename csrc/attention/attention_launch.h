// at::Tensor entry points of the attention ops (registered in ops.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <tuple>

namespace cm3leon::attention {

// q [B, Sq, Hq, D], k/v [B, Sk, Hkv, D] -> (out [B, Sq, Hq, D], lse float32 [B, Hq, Sq]).
std::tuple<at::Tensor, at::Tensor> forward_cpu_launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      double softmax_scale, bool causal);
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu_launch(const at::Tensor& dout, const at::Tensor& q,
                                                                   const at::Tensor& k, const at::Tensor& v,
                                                                   const at::Tensor& out, const at::Tensor& lse,
                                                                   double softmax_scale, bool causal);

// Packed documents: q [Tq, Hq, D], k/v [Tk, Hkv, D], int32 cu_seqlens -> (out, lse float32 [Hq, Tq]).
std::tuple<at::Tensor, at::Tensor> varlen_forward_cpu_launch(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                             const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                             int64_t max_seqlen_k, double softmax_scale,
                                                             bool causal);
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_backward_cpu_launch(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, double softmax_scale, bool causal);

// KV cache: appends k/v [B, Sn, Hkv, D] into k_cache/v_cache [B, L, Hkv, D] at cache_seqlens (int32 [B], or
// the scalar cache_seqlen for every row when absent), then attends q [B, Sq, Hq, D] to the valid prefix.
std::tuple<at::Tensor, at::Tensor> kvcache_cpu_launch(const at::Tensor& q, const at::Tensor& k_cache,
                                                      const at::Tensor& v_cache, const c10::optional<at::Tensor>& k,
                                                      const c10::optional<at::Tensor>& v,
                                                      const c10::optional<at::Tensor>& cache_seqlens,
                                                      int64_t cache_seqlen, double softmax_scale, bool causal);

}  // namespace cm3leon::attention
