// at::Tensor entry points of the CUDA attention forward ops (registered in ops.cpp); same schemas and
// semantics as the CPU launchers in attention_launch.h.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <tuple>

#include "attention/attention_checks.h"

namespace cm3leon::attention {

namespace cuda {
struct AttnParams;
}

// The extras (checked by check_extras, which gives alibi_stride) as AttnParams fields (forward and backward).
void set_extras(cuda::AttnParams& p, int64_t window_left, int64_t window_right, double softcap,
                const c10::optional<at::Tensor>& alibi_slopes, int64_t alibi_stride);

std::tuple<at::Tensor, at::Tensor> forward_cuda_launch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       double softmax_scale, bool causal,
                                                       CM3LEON_ATTN_EXTRA_PARAMS);

// cu_seqlens live on the GPU and are not read back (no host sync): out-of-range values are clamped by the
// kernels, never dereferenced out of bounds, but not reported.
std::tuple<at::Tensor, at::Tensor> varlen_forward_cuda_launch(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                              const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                              int64_t max_seqlen_k, double softmax_scale,
                                                              bool causal, CM3LEON_ATTN_EXTRA_PARAMS);

// cache_seqlens as a GPU tensor is not read back either: positions past the cache are skipped by the append
// and the attended length is clamped to the cache. An int cache_seqlen is checked on the host.
std::tuple<at::Tensor, at::Tensor> kvcache_cuda_launch(const at::Tensor& q, const at::Tensor& k_cache,
                                                       const at::Tensor& v_cache, const c10::optional<at::Tensor>& k,
                                                       const c10::optional<at::Tensor>& v,
                                                       const c10::optional<at::Tensor>& cache_seqlens,
                                                       int64_t cache_seqlen, double softmax_scale, bool causal,
                                                       int64_t window_left, int64_t window_right, double softcap,
                                                       const c10::optional<at::Tensor>& alibi_slopes,
                                                       const c10::optional<at::Tensor>& rotary_cos,
                                                       const c10::optional<at::Tensor>& rotary_sin,
                                                       bool rotary_interleaved,
                                                       const c10::optional<at::Tensor>& cache_batch_idx,
                                                       const c10::optional<at::Tensor>& cache_leftpad,
                                                       const c10::optional<at::Tensor>& block_table,
                                                       int64_t num_splits);

}  // namespace cm3leon::attention
