// Fused attention on the CPU (torch-free). Contract: docs/attention.md.
//
// Tensors are token-major and contiguous: q/out rows are [token][heads_q][head_dim], k/v rows
// [token][heads_kv][head_dim]. A Segment says where one batch row (or one packed document) lives, so the
// dense, packed (varlen) and KV-cache layouts share one kernel.
#pragma once
#include <cstdint>
#include "common/dtype.h"

namespace cm3leon::attention {

struct Segment {
  int64_t q_start, q_len;  // first query token and count (token index into q/out/dq)
  int64_t k_start, k_len;  // first key token and count (token index into k/v/dk/dv)
  int64_t lse_start;       // lse index of (head 0, query 0); head h adds h * Problem::lse_head_stride
};

struct Problem {
  DType dtype;
  const Segment* segments;
  int64_t num_segments;
  int64_t heads_q, heads_kv, head_dim;  // head_dim: multiple of 8, at most 256
  int64_t lse_head_stride;
  float scale;  // softmax scale applied to q.k
  bool causal;  // bottom-right aligned: query i sees keys j <= i + k_len - q_len
  int threads;   // CPU threads the kernel may use (the launcher passes torch's setting)
};

// out = softmax(scale * q k^T + mask) v; lse = log-sum-exp of each row's scaled scores (natural log).
// Rows with no visible key get out = 0 and lse = -inf. Short queries (decode) take a split-KV path that
// shares each K/V row between the query heads of a GQA group and merges partial results by their lse.
void forward_cpu(const Problem& p, const void* q, const void* k, const void* v, void* out, float* lse);

// Gradients of forward_cpu given dout, the forward output and its lse (probabilities are recomputed block
// by block). dk/dv have k's shape: GQA gradients are summed over the query heads that share a kv head.
void backward_cpu(const Problem& p, const void* q, const void* k, const void* v, const void* out,
                  const float* lse, const void* dout, void* dq, void* dk, void* dv);

// Copies new rows [batch][new_len][heads_kv * head_dim] into cache rows [batch][cache_len][...] starting at
// position starts[b] of each batch row (the caller has checked starts[b] + new_len <= cache_len).
void append_cpu(int64_t elem_size, const void* src, void* cache, int64_t batch, int64_t new_len,
                int64_t cache_len, int64_t row_elems, const int32_t* starts, int32_t start_if_null);

}  // namespace cm3leon::attention
