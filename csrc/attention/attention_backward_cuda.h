// Torch-free CUDA entry point of the attention backward (host function taking raw pointers and a stream).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>
#include "common/dtype.h"

namespace cm3leon::attention {

// One backward problem, dense ([batch, seqlen, heads, head_dim] rows) or packed (cu_seqlens given).
// Tensors are token-major and contiguous: q/out/dout/dq rows are [token][heads_q][head_dim], k/v/dk/dv rows
// [token][heads_kv][head_dim]. Pointers to q, k, v, out, dout must be 16-byte aligned (vector loads).
struct BackwardParams {
  DType dtype;
  const void *q, *k, *v, *out, *dout;
  const float* lse;  // natural log; dense [batch, heads_q, seqlen_q], packed [heads_q, total_q]
  void *dq, *dk, *dv;
  // Workspaces (float32): dq_accum [total_q, heads_q, head_dim] (the kernel zeroes it itself),
  // dsum [heads_q, total_q] (rowsum(dout * out)).
  float *dq_accum, *dsum;
  // Packed documents: int32 [batch + 1] on the device, or both null for the dense layout. The kernel trusts
  // them to be valid (checked by the forward); it clamps them to [0, total] so bad values cannot fault.
  const int32_t *cu_seqlens_q, *cu_seqlens_k;
  int64_t batch;
  int64_t seqlen_q, seqlen_k;  // dense: every row's lengths; packed: max_seqlen_q / _k, grid size only
  int64_t total_q, total_k;    // token counts (dense: batch * seqlen)
  int64_t heads_q, heads_kv, head_dim;  // head_dim a multiple of 8 in [8, 256]; heads_q % heads_kv == 0
  float scale;  // softmax scale applied to q.k
  bool causal;  // bottom-right aligned: query i sees keys j <= i + k_len - q_len
};

// dq, dk, dv of the attention forward (probabilities recomputed from lse). dk/dv of a kv head are summed over
// the query heads that share it (GQA). Returns the first CUDA error (e.g. not enough shared memory for
// head_dim 256 on GPUs with less than 144 KB per block).
cudaError_t backward_cuda(const BackwardParams& p, cudaStream_t stream);

}  // namespace cm3leon::attention
