// Device helpers shared by the attention backward kernels: which batch row / document a block works on, the
// (bottom-right aligned) causal visibility rule, and where a query row's lse and D = rowsum(dO * O) live.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "attention/attention_backward_cuda.h"

namespace cm3leon::attention::bwd {

constexpr float kLog2e = 1.4426950408889634f;

// One batch row (dense) or packed document: token offsets into q / k and the lengths.
struct Seg {
  int64_t q_start, k_start;
  int q_len, k_len;
};

__device__ inline int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

__device__ inline Seg segment(const BackwardParams& p, int64_t b) {
  if (p.cu_seqlens_q == nullptr)
    return {b * p.seqlen_q, b * p.seqlen_k, int(p.seqlen_q), int(p.seqlen_k)};
  // Clamped so inconsistent cu_seqlens cannot address memory outside q/k (the values are not re-validated
  // here: that would need a host sync).
  const int64_t q0 = clamp64(p.cu_seqlens_q[b], 0, p.total_q);
  const int64_t q1 = clamp64(p.cu_seqlens_q[b + 1], q0, p.total_q);
  const int64_t k0 = clamp64(p.cu_seqlens_k[b], 0, p.total_k);
  const int64_t k1 = clamp64(p.cu_seqlens_k[b + 1], k0, p.total_k);
  return {q0, k0, int(q1 - q0), int(k1 - k0)};
}

// Key blocks per (batch row / document, kv head) in the main kernels' grid: those of seqlen_k (varlen: the
// max_seqlen_k argument), at least one when there are keys. A block strides over the key blocks of its
// document, so a document longer than max_seqlen_k is still covered completely (too small a max_seqlen_k
// costs time, not correctness), as in the forward.
__host__ __device__ inline int64_t grid_key_blocks(const BackwardParams& p, int block_n) {
  const int64_t n = (p.seqlen_k + block_n - 1) / block_n;
  return n > 0 || p.total_k == 0 ? n : 1;
}

// The work of a main-kernel block: key blocks first_n_block, first_n_block + n_stride, ... (those inside the
// document) of kv head `head_kv` in batch row / document `b` (one flat grid dimension, so no 65535 limit on
// heads or documents).
struct Item {
  int first_n_block, n_stride;  // int: at most ceil(2^31 / block_n) key blocks (lengths are int32)
  int head_kv;
  int64_t b;
};

__device__ inline Item work_item(const BackwardParams& p, int block_n) {
  const int64_t n_blocks = grid_key_blocks(p, block_n);  // > 0: the grid is empty otherwise
  const int64_t i = blockIdx.x;
  return {int(i % n_blocks), int(n_blocks), int(i / n_blocks % p.heads_kv), i / n_blocks / p.heads_kv};
}

// x, hidden from the optimiser (no instruction is emitted). The tiles start from opaque(threadIdx.x): their
// per-thread offsets are then recomputed per key block instead of being hoisted out of the kernel's key-block
// loop and held in registers across it (which made the head-dim-256 kernel, at the 255-register limit, spill
// 250 bytes).
__device__ __forceinline__ int opaque(int x) {
  asm volatile("" : "+r"(x));
  return x;
}

// Query qi sees key kj (both segment-relative); padding rows/columns see nothing.
__device__ inline bool visible(int qi, int kj, const Seg& s, bool causal) {
  return qi < s.q_len && kj < s.k_len && (!causal || kj <= qi + s.k_len - s.q_len);
}

// The first query of the segment that sees key n0 (every later query sees it too); q_len or more: none.
__device__ inline int first_query(const Seg& s, int n0, bool causal) {
  const int first = n0 - (s.k_len - s.q_len);
  return causal ? (first > 0 ? first : 0) : 0;
}

// lse of (head h, query qi) in base 2. A row that saw no key has lse = -inf: +inf keeps 2^(s - lse) at 0.
__device__ inline float lse_log2(const BackwardParams& p, int64_t b, const Seg& s, int h, int qi) {
  const int64_t i = p.cu_seqlens_q ? h * p.total_q + s.q_start + qi : (b * p.heads_q + h) * p.seqlen_q + qi;
  const float lse = p.lse[i];
  return lse == -INFINITY ? INFINITY : lse * kLog2e;
}

// D of (head h, query qi): dsum is [heads_q, total_q] in both layouts.
__device__ inline float dsum_at(const BackwardParams& p, const Seg& s, int h, int qi) {
  return p.dsum[h * p.total_q + s.q_start + qi];
}

}  // namespace cm3leon::attention::bwd
