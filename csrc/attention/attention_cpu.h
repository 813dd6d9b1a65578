// Fused attention on the CPU (torch-free). Contract: docs/attention.md.
//
// Tensors are token-major and contiguous: q/out rows are [token][heads_q][head_dim], k/v rows
// [token][heads_kv][head_dim]. A Segment says where one batch row (or one packed document) lives, so the
// dense, packed (varlen) and KV-cache layouts share one kernel.
#pragma once
#include <cstdint>

#include "attention/attention_dropout.h"
#include "common/cpu_features.h"
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
  int64_t heads_q, heads_kv, head_dim;  // head_dim in [1, 256]
  int64_t lse_head_stride;
  float scale;  // softmax scale applied to q.k
  bool causal;  // bottom-right aligned: query i sees keys j <= i + k_len - q_len
  int threads;   // CPU threads the kernel may use (the launcher passes torch's setting)
  // Local attention: query i (diagonal d = i + k_len - q_len) sees keys j with d - window_left <= j <=
  // d + window_right; -1 leaves that side unbounded (causal is the same as window_right = 0).
  int64_t window_left = -1, window_right = -1;
  float softcap = 0.f;                    // > 0: each scaled score s becomes softcap * tanh(s / softcap)
  const float* alibi_slopes = nullptr;    // ALiBi: s -= slope * |d - j|, slopes fp32 [segment][heads_q]
  int64_t alibi_segment_stride = 0;       // 0 when every segment shares one row of slopes
  bool deterministic = false;             // backward: bit-identical gradients for any thread count
  // Dropout (threshold > 0): probabilities dropped by dropout_row (stream segment * heads_q + head) are 0,
  // kept ones are scaled by dropout_scale = 1 / (1 - p); lse stays that of the undropped scores.
  DropoutStream dropout;
  float dropout_scale = 1.f;
};

// Highest level with its own attention bodies (forward, decode, backward; at avx512_bf16 and amx_bf16 the
// bf16 forward takes its products from bf16 pairs): common/cpu_features.h dispatch.
constexpr Isa kAttentionMaxIsa = Isa::AmxBf16;

// The kernel bodies, one explicit specialisation per compiled level (attention_*_cpu.cpp).
template <Isa I>
void forward_kernel(const Problem& p, const void* q, const void* k, const void* v, void* out, float* lse);
template <Isa I>
void backward_kernel(const Problem& p, const void* q, const void* k, const void* v, const void* out,
                     const float* lse, const void* dout, void* dq, void* dk, void* dv);

// The entry points exist for host code only (launchers); kernel objects define the bodies above.
#if !defined(CM3LEON_ISA_LEVEL)
CM3LEON_ISA_BEGIN

// out = softmax(scale * q k^T + mask) v; lse = log-sum-exp of each row's scaled scores (natural log).
// Rows with no visible key get out = 0 and lse = -inf. With dropout, out = (dropped, scaled P) v. Short
// queries without dropout (decode) take a split-KV path that shares each K/V row between the query heads of
// a GQA group and merges partial results by their lse.
// (Runs the body of the level chosen at load time, as every entry point here.)
inline void forward_cpu(const Problem& p, const void* q, const void* k, const void* v, void* out, float* lse) {
  dispatch_isa<kAttentionMaxIsa>([&](auto isa) { forward_kernel<decltype(isa)::value>(p, q, k, v, out, lse); });
}

// Gradients of forward_cpu given dout, the forward output and its lse (probabilities are recomputed block
// by block, the dropout mask regenerated). dk/dv have k's shape: GQA gradients are summed over the query
// heads that share a kv head.
inline void backward_cpu(const Problem& p, const void* q, const void* k, const void* v, const void* out,
                         const float* lse, const void* dout, void* dq, void* dk, void* dv) {
  dispatch_isa<kAttentionMaxIsa>([&](auto isa) {
    backward_kernel<decltype(isa)::value>(p, q, k, v, out, lse, dout, dq, dk, dv);
  });
}

CM3LEON_ISA_END
#endif
}  // namespace cm3leon::attention
