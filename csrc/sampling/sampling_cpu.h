// Fused CFG / contrastive (CD-K) sampling on the CPU (torch-free). See
// docs/sampling.md for the exact semantics; cm3leon_kernels/reference.py holds the float64 oracle.
#pragma once
#include <cstdint>
#include "common/dtype.h"
#include "sampling/sampling_types.h"

namespace cm3leon::sampling {

// logits: [B, S, V] with strides (row_stride, stream_stride, 1), stream 0 unconditional; only the tokens in
// allowed's range are read. Writes tokens[B] and, if non-null, logprobs[B] (log-probability of the drawn
// token under the final distribution; 0 for greedy). Uses up to `threads` CPU threads.
RowError cfg_sample_cpu(DType dtype, const void* logits, int64_t batch, int64_t row_stride, int64_t stream_stride,
                        const CfgOptions& options, const Vocab& allowed, const SeedSpec& seeds, int64_t* tokens,
                        float* logprobs, int threads);

// expert, amateur: [B, V] with row strides; both of `dtype`.
RowError contrastive_sample_cpu(DType dtype, const void* expert, const void* amateur, int64_t batch,
                                int64_t expert_row_stride, int64_t amateur_row_stride,
                                const ContrastiveOptions& options, const Vocab& allowed, const SeedSpec& seeds,
                                int64_t* tokens, float* logprobs, int threads);

}  // namespace cm3leon::sampling
