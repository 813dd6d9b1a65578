// Internal: the split-KV path for short queries (decode), used by forward_cpu and by the KV-cache launcher.
#pragma once
#include "attention/attention_cpu.h"

namespace cm3leon::attention {

// Where decode finds the keys of a segment and how it splits them. Contiguous (block_table null): key n of
// segment s is token k_start + n of k/v. Paged: k/v are [num_blocks][page][heads_kv][head_dim] and key n of
// segment s is logical position p = k_start + n of row s of block_table ([num_segments][table_stride]),
// stored in block block_table[s][p / page], slot p % page. The caller has checked every block id it reads.
struct DecodeLayout {
  const int32_t* block_table = nullptr;
  int64_t table_stride = 0, page = 0;
  int64_t num_splits = 0;  // 0: chosen from the thread count and key count; n > 0: at most n key slices
};

template <Isa I>
bool decode_kernel(const Problem& p, const DecodeLayout& layout, const void* q, const void* k, const void* v,
                   void* out, float* lse);

#if !defined(CM3LEON_ISA_LEVEL)
CM3LEON_ISA_BEGIN
// Runs the decode path when it applies at the active level (few query rows per kv head, AVX2 or better) and
// returns true; returns false (nothing written) otherwise, and the caller takes the tiled forward.
inline bool decode_cpu(const Problem& p, const DecodeLayout& layout, const void* q, const void* k, const void* v,
                       void* out, float* lse) {
  return dispatch_isa<kAttentionMaxIsa>(
      [&](auto isa) { return decode_kernel<decltype(isa)::value>(p, layout, q, k, v, out, lse); });
}
CM3LEON_ISA_END
#else
CM3LEON_ISA_BEGIN

// Whether the decode path handles this problem (few query rows per kv head, AVX2 build).
bool decode_applies(const Problem& p);

void decode_forward(const Problem& p, const void* q, const void* k, const void* v, void* out, float* lse,
                    const DecodeLayout& layout = {});

CM3LEON_ISA_END
#endif
}  // namespace cm3leon::attention
