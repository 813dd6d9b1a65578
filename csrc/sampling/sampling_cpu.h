// Fused CFG / contrastive (CD-K) sampling on the CPU (torch-free). See
// docs/sampling.md for the exact semantics; cm3leon_kernels/reference.py holds the float64 oracle.
#pragma once
#include <cstdint>
#include "common/cpu_features.h"
#include "common/dtype.h"
#include "sampling/sampling_types.h"

namespace cm3leon::sampling {

// Highest level with its own sampling bodies (AVX2: the samplers' vector paths are 8 lanes wide); one
// explicit specialisation per compiled level (sampling_cpu.cpp).
constexpr Isa kSamplingMaxIsa = Isa::Avx2;
template <Isa I>
RowError cfg_sample_kernel(DType dtype, const void* logits, int64_t batch, int64_t row_stride,
                           int64_t stream_stride, const CfgOptions& options, const Vocab& allowed,
                           const SeedSpec& seeds, int64_t* tokens, float* logprobs, int threads);
template <Isa I>
RowError contrastive_sample_kernel(DType dtype, const void* expert, const void* amateur, int64_t batch,
                                   int64_t expert_row_stride, int64_t amateur_row_stride,
                                   const ContrastiveOptions& options, const Vocab& allowed, const SeedSpec& seeds,
                                   int64_t* tokens, float* logprobs, int threads);

// The entry points exist for host code only (launchers); kernel objects define the bodies above.
#if !defined(CM3LEON_ISA_LEVEL)
CM3LEON_ISA_BEGIN

// logits: [B, S, V] with strides (row_stride, stream_stride, 1), stream 0 unconditional; only the tokens in
// allowed's range are read. Writes tokens[B] and, if non-null, logprobs[B] (log-probability of the drawn
// token under the final distribution; 0 for greedy). Uses up to `threads` CPU threads.
inline RowError cfg_sample_cpu(DType dtype, const void* logits, int64_t batch, int64_t row_stride,
                               int64_t stream_stride, const CfgOptions& options, const Vocab& allowed,
                               const SeedSpec& seeds, int64_t* tokens, float* logprobs, int threads) {
  return dispatch_isa<kSamplingMaxIsa>([&](auto isa) {
    return cfg_sample_kernel<decltype(isa)::value>(dtype, logits, batch, row_stride, stream_stride, options,
                                                   allowed, seeds, tokens, logprobs, threads);
  });
}

// expert, amateur: [B, V] with row strides; both of `dtype`.
inline RowError contrastive_sample_cpu(DType dtype, const void* expert, const void* amateur, int64_t batch,
                                       int64_t expert_row_stride, int64_t amateur_row_stride,
                                       const ContrastiveOptions& options, const Vocab& allowed,
                                       const SeedSpec& seeds, int64_t* tokens, float* logprobs, int threads) {
  return dispatch_isa<kSamplingMaxIsa>([&](auto isa) {
    return contrastive_sample_kernel<decltype(isa)::value>(dtype, expert, amateur, batch, expert_row_stride,
                                                           amateur_row_stride, options, allowed, seeds, tokens,
                                                           logprobs, threads);
  });
}

CM3LEON_ISA_END
#endif
}  // namespace cm3leon::sampling
