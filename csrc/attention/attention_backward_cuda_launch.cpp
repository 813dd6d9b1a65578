#include "attention/attention_launch.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <climits>
#include <cstdint>

#include "attention/attention_backward_cuda.h"
#include "attention/attention_checks.h"
#include "attention/attention_cuda_extras.h"
#include "common/tensor_checks.h"

namespace cm3leon::attention {
namespace {

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

// Shapes, dtypes, devices and contiguity of the backward's tensors (Python validates first; this is the
// second line of defence, so bad input raises instead of reading out of bounds).
void check_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& out, const at::Tensor& lse, int64_t ndim, at::IntArrayRef lse_shape) {
  check_qkv(q, k, v, ndim);
  TORCH_CHECK_VALUE(q.is_cuda(), "q must be a CUDA tensor");
  check_backward(dout, q, out, lse, lse_shape);
}

// Allocates the gradients and the fp32 workspaces (dQ accumulator, D = rowsum(dO * O)) and runs the kernels.
Grads run(BackwardParams p, const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in,
          const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse, const char* op) {
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor dout = aligned16(dout_in), q = aligned16(q_in), k = aligned16(k_in), v = aligned16(v_in);
  const at::Tensor out = aligned16(out_in);
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  const at::TensorOptions f32 = q.options().dtype(at::kFloat);
  at::Tensor dq_accum = at::empty({p.total_q, p.heads_q, p.head_dim}, f32);
  at::Tensor dsum = at::empty({p.heads_q, p.total_q}, f32);
  p.dtype = float_dtype(q, "q");
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.dout = dout.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dsum = dsum.data_ptr<float>();
  const cudaError_t err = backward_cuda(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, op, " CUDA launch failed: ", cudaGetErrorString(err));
  return {dq, dk, dv};
}

BackwardParams base_params(const at::Tensor& q, const at::Tensor& k, double softmax_scale, bool causal) {
  BackwardParams p{};
  p.heads_q = int(q.size(-2));
  p.heads_kv = int(k.size(-2));
  p.head_dim = int(q.size(-1));
  p.q_row_stride = q.size(-2) * q.size(-1);
  p.k_row_stride = k.size(-2) * k.size(-1);
  check_softmax_scale(softmax_scale);
  p.scale = float(softmax_scale);
  p.causal = causal;
  return p;
}

}  // namespace

Grads backward_cuda_launch(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                           double softmax_scale, bool causal, CM3LEON_ATTN_EXTRA_PARAMS) {
  check_inputs(dout, q, k, v, out, lse, 4, {q.size(0), q.size(2), q.size(1)});
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), "k's batch (", k.size(0), ") must equal q's (", q.size(0), ")");
  const int64_t alibi_stride = check_extras(q, q.size(0), window_left, window_right, softcap, alibi_slopes);
  check_cuda_support(q, deterministic, dropout_p);
  TORCH_CHECK_VALUE(q.size(0) <= INT_MAX && q.size(1) <= INT_MAX && k.size(1) <= INT_MAX,
                    "batch and sequence lengths must fit in int32");
  BackwardParams p = base_params(q, k, softmax_scale, causal);
  set_extras(p, window_left, window_right, softcap, alibi_slopes, alibi_stride);
  set_dense_layout(p, q, k);
  return run(p, dout, q, k, v, out, lse, "flash_attn_backward");
}

Grads varlen_backward_cuda_launch(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                  const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                  const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                  int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale,
                                  bool causal, CM3LEON_ATTN_EXTRA_PARAMS) {
  check_inputs(dout, q, k, v, out, lse, 3, {q.size(1), q.size(0)});
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q);
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q);
  TORCH_CHECK_VALUE(cu_seqlens_q.size(0) == cu_seqlens_k.size(0),
                    "cu_seqlens_q and cu_seqlens_k must have the same length, got ", cu_seqlens_q.size(0),
                    " and ", cu_seqlens_k.size(0));
  const int64_t alibi_stride =
      check_extras(q, cu_seqlens_q.size(0) - 1, window_left, window_right, softcap, alibi_slopes);
  check_cuda_support(q, deterministic, dropout_p);
  TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0 && max_seqlen_q <= INT_MAX &&
                        max_seqlen_k <= INT_MAX,
                    "max_seqlen_q and max_seqlen_k must be in [0, 2^31), got ", max_seqlen_q, " and ",
                    max_seqlen_k);
  // Document lengths are held in int32 on the device (a document may be as long as its tensor).
  TORCH_CHECK_VALUE(q.size(0) <= INT_MAX && k.size(0) <= INT_MAX, "token counts must fit in int32, got ",
                    q.size(0), " and ", k.size(0));
  // cu_seqlens live on the GPU: their values are not re-checked here (that would need a host sync); the
  // kernels clamp them to the token counts, so inconsistent values give wrong gradients, never bad accesses.
  // max_seqlen_q / max_seqlen_k only size the grid: blocks stride over the key blocks of longer documents.
  TORCH_CHECK_VALUE(cu_seqlens_q.size(0) - 1 <= INT_MAX, "the number of documents must fit in int32");
  BackwardParams p = base_params(q, k, softmax_scale, causal);
  set_extras(p, window_left, window_right, softcap, alibi_slopes, alibi_stride);
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  p.batch = int(cu_seqlens_q.size(0) - 1);
  p.seqlen_q = int(max_seqlen_q);
  p.seqlen_k = int(max_seqlen_k);
  p.total_q = q.size(0);
  p.total_k = k.size(0);
  p.lse_head_stride = q.size(0);
  return run(p, dout, q, k, v, out, lse, "flash_attn_varlen_backward");
}

}  // namespace cm3leon::attention
