// AVX2 building blocks shared by the CPU kernels (torch-free, header-only). CM3LEON_AVX2 is defined when the
// kernels are compiled for a CPU with AVX2, FMA and F16C; every user keeps a scalar path for the others.
#pragma once
#include "common/isa.h"
#include "common/half.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define CM3LEON_AVX2 1

namespace cm3leon {
CM3LEON_ISA_BEGIN

// Eight consecutive elements widened to fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const fp16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

CM3LEON_ISA_END
}  // namespace cm3leon
#endif
