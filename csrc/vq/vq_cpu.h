// Fused VQ codebook lookup on the CPU (torch-free). Contract: docs/vq.md.
#pragma once
#include <cstdint>
#include "common/cpu_features.h"
#include "common/dtype.h"

namespace cm3leon::vq {

enum class Metric { L2, Cosine };

// Highest level with its own VQ bodies; one explicit specialisation per compiled level (vq_cpu.cpp).
constexpr Isa kVqMaxIsa = Isa::AmxBf16;
template <Isa I>
int64_t nearest_kernel(DType dtype, const void* z, const void* codebook, int64_t n, int64_t k, int64_t d,
                       Metric metric, int64_t* indices, float* distance, int threads);
template <Isa I>
int64_t embed_kernel(DType dtype, const int64_t* indices, const void* codebook, int64_t n, int64_t k, int64_t d,
                     void* out, int threads);

// The entry points exist for host code only (launchers); kernel objects define the bodies above.
#if !defined(CM3LEON_ISA_LEVEL)
CM3LEON_ISA_BEGIN

// For each of the n rows of z [n, d] finds the nearest of the k codebook rows [k, d] (ties: lowest index).
// Writes indices[n] and distance[n]: squared euclidean distance (L2) or 1 - cosine similarity (Cosine).
// Never forms the n x k distance matrix. Returns the number of rows whose distances were all NaN/inf
// (their outputs are unspecified), so the caller can reject non-finite input without a separate pass.
// Both functions use up to `threads` CPU threads and run the body of the level chosen at load time.
inline int64_t nearest_cpu(DType dtype, const void* z, const void* codebook, int64_t n, int64_t k, int64_t d,
                           Metric metric, int64_t* indices, float* distance, int threads) {
  return dispatch_isa<kVqMaxIsa>([&](auto isa) {
    return nearest_kernel<decltype(isa)::value>(dtype, z, codebook, n, k, d, metric, indices, distance, threads);
  });
}

// out[i, :] = codebook[indices[i], :]. Returns the position of the first index outside [0, k), or -1.
inline int64_t embed_cpu(DType dtype, const int64_t* indices, const void* codebook, int64_t n, int64_t k,
                         int64_t d, void* out, int threads) {
  return dispatch_isa<kVqMaxIsa>([&](auto isa) {
    return embed_kernel<decltype(isa)::value>(dtype, indices, codebook, n, k, d, out, threads);
  });
}

CM3LEON_ISA_END
#endif
}  // namespace cm3leon::vq
