// Where the CUDA KV-cache kernels find a batch row's cache positions (torch-free; host and device).
#pragma once
#include <cstdint>

#include "attention/attention_cuda_params.cuh"

namespace cm3leon::attention::cuda {

// Device values (block ids, batch indices, leftpads) are not read back on the host (no sync): the kernels
// clamp them into range, so a bad value never reads or writes out of bounds, but it is not reported.
struct KvLayout {
  const int32_t* block_table = nullptr;  // paged: [batch][table_stride] block ids, pages of `page` positions
  int64_t table_stride = 0, page = 0, num_blocks = 0;
  const int32_t* cache_batch_idx = nullptr;  // contiguous: q row b uses cache row cache_batch_idx[b]
  int64_t cache_rows = 0;
  const int32_t* cache_leftpad = nullptr;  // keys before position cache_leftpad[b] are invisible
  int64_t capacity = 0;                    // positions per row (seqlen_cache, or table_stride * page)

#ifdef __CUDACC__
  // Token index in k_cache/v_cache (as [tokens][heads_kv][head_dim]) of logical position pos of batch row b.
  __device__ int64_t token(int b, int64_t pos) const {
    if (block_table != nullptr) {
      const int64_t blk = clamp64(block_table[int64_t(b) * table_stride + pos / page], 0, num_blocks - 1);
      return blk * page + pos % page;
    }
    const int64_t row = cache_batch_idx != nullptr ? clamp64(cache_batch_idx[b], 0, cache_rows - 1) : b;
    return row * capacity + pos;
  }
  // First visible position of row b, whose keys end at k_len.
  __device__ int leftpad(int b, int k_len) const {
    return cache_leftpad != nullptr ? int(clamp64(cache_leftpad[b], 0, k_len)) : 0;
  }
#endif
};

// Rotary embedding of src [batch][len][heads][head_dim]: token t of row b is rotated at position
// start + t (per_token) or start (start = cache_seqlens[b], or start_if_null), by cos/sin
// [seqlen_ro][rotary_dim / 2] of src's dtype; pairs (2i, 2i + 1) when interleaved, else (i, i + rotary_dim / 2).
// into_cache: dst is a KV cache and token t goes to position start + t of row b through `cache`; else dst has
// src's layout. Positions past the table are clamped to its last row, past the cache skipped (device values).
struct RotaryCall {
  const void* src;
  void* dst;
  int64_t batch, len, heads, head_dim;
  const void* cos;
  const void* sin;
  int64_t rotary_dim, seqlen_ro;
  bool interleaved, per_token, into_cache;
  const int32_t* cache_seqlens;
  int32_t start_if_null;
  KvLayout cache;
};

}  // namespace cm3leon::attention::cuda
