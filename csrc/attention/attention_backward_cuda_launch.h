// at::Tensor entry points of the CUDA attention backward (registered in ops.cpp). Same schemas and semantics
// as backward_cpu_launch / varlen_backward_cpu_launch in attention_launch.h.
#pragma once
#include <ATen/core/Tensor.h>
#include <tuple>

#include "attention/attention_checks.h"

namespace cm3leon::attention {

// dout, q, out [B, Sq, Hq, D], k/v [B, Sk, Hkv, D], lse float32 [B, Hq, Sq] -> (dq, dk, dv).
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda_launch(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, double softmax_scale, bool causal, CM3LEON_ATTN_EXTRA_PARAMS);

// Packed documents: dout, q, out [Tq, Hq, D], k/v [Tk, Hkv, D], lse [Hq, Tq], int32 cu_seqlens on the GPU.
std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_backward_cuda_launch(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens_q,
    const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
    bool causal, CM3LEON_ATTN_EXTRA_PARAMS);

}  // namespace cm3leon::attention
