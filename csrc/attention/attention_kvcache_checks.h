// Argument checks of the KV-cache op shared by its CPU and CUDA launchers (attention_kvcache_launch.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>

namespace cm3leon::attention {

// The op's optional features, as the schema passes them (the launchers' trailing arguments).
struct KvcacheOptions {
  int64_t window_left = -1, window_right = -1;
  double softcap = 0.0;
  std::optional<at::Tensor> alibi_slopes;
  std::optional<at::Tensor> rotary_cos;
  std::optional<at::Tensor> rotary_sin;
  bool rotary_interleaved = true;
  std::optional<at::Tensor> cache_batch_idx;
  std::optional<at::Tensor> cache_leftpad;
  std::optional<at::Tensor> block_table;
  int64_t num_splits = 0;
};

// What the shape checks derived.
struct KvcacheShape {
  int64_t new_len = 0;     // tokens appended per row (0 without k/v)
  int64_t capacity = 0;    // positions per cache row: seqlen_cache, or max_blocks_per_seq * page_block_size
  int64_t page = 0;        // page_block_size of a paged cache (block_table given), else 0
  int64_t rotary_dim = 0;  // 0 without rotary
  int64_t alibi_stride = 0;  // alibi_slopes' per-row stride (check_extras)
};

// Types, shapes and devices of every argument (q/k_cache/v_cache as check_qkv; k/v matching the cache;
// cache_seqlens, cache_batch_idx, cache_leftpad int32 [batch]; block_table int32 [batch, blocks]; rotary
// tables (seqlen_ro, rotary_dim / 2) of q's dtype; windows, softcap and alibi_slopes as check_extras), plus
// softmax_scale and num_splits. Reads no tensor data, so CUDA inputs cost no sync;
// the values are the device launcher's to check.
KvcacheShape check_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
                           const std::optional<at::Tensor>& cache_seqlens, double softmax_scale,
                           const KvcacheOptions& o);

}  // namespace cm3leon::attention
