// Internal: the split-KV path for short queries (decode), used by forward_cpu.
#pragma once
#include "attention/attention_cpu.h"

namespace cm3leon::attention {
CM3LEON_ISA_BEGIN

// Whether the decode path handles this problem (few query rows per kv head, AVX2 build).
bool decode_applies(const Problem& p);

void decode_forward(const Problem& p, const void* q, const void* k, const void* v, void* out, float* lse);

CM3LEON_ISA_END
}  // namespace cm3leon::attention
