// Device helpers shared by the attention backward kernels: which batch row / document and key blocks a block
// works on, and where a query row's lse and D = rowsum(dO * O) live (SeqInfo and the visibility rule are the
// forward's, attention_cuda_params.cuh).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "attention/attention_backward_cuda.h"

namespace cm3leon::attention::bwd {

using cuda::clamp64;
using cuda::exp_diff;
using cuda::ScoreMod;
using cuda::SeqInfo;

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

// lse of (head h, query qi), as P = exp_diff(s, lse) takes it: a row that saw no key has lse = -inf, and
// +inf keeps its P at 0.
__device__ inline float lse_for_p(const BackwardParams& p, const SeqInfo& s, int h, int qi) {
  const float lse = p.lse[s.lse_start + int64_t(h) * p.lse_head_stride + qi];
  return lse == -INFINITY ? INFINITY : lse;
}

// D of (head h, query qi): dsum is [heads_q, total_q] in both layouts.
__device__ inline float dsum_at(const BackwardParams& p, const SeqInfo& s, int h, int qi) {
  return p.dsum[h * p.total_q + s.q_start + qi];
}

}  // namespace cm3leon::attention::bwd
