// The few vector primitives of the sampling kernels (AVX2+FMA, with scalar twins). Each scalar twin runs the
// same sequence of fp32 operations (explicit fma) as its vector lane, so a token's weight is bit-identical
// whichever path computed it: the inverse-CDF draw re-derives weights one by one inside the chosen chunk.
#pragma once
#include "common/isa.h"
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/half.h"
#include "common/simd.h"
#include "sampling/sampling_math.h"

namespace cm3leon::sampling::simd {
CM3LEON_ISA_BEGIN

// The scalar exp_nonpositive lives in sampling_math.h (shared with the CUDA kernels); the vector one below
// runs the same operations lane by lane.
using cm3leon::sampling::exp_nonpositive;

#if CM3LEON_AVX2
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.f), shifter = _mm256_set1_ps(12582912.f);
  const __m256 xc = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504f), shifter), shifter);
  __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693145752f), xc);
  r = _mm256_fmadd_ps(n, _mm256_set1_ps(-1.42860677e-6f), r);
  __m256 p = _mm256_set1_ps(1.f / 720.f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LE_OQ), e);
}

using cm3leon::load8;
// 8 bools -> all-ones lanes where true.
inline __m256 load_mask8(const bool* p) {
  int64_t bytes;
  std::memcpy(&bytes, p, sizeof bytes);
  const __m256i v = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(v, _mm256_setzero_si256()));
}
// All-ones lanes where the 8 bools are false (the token is masked out).
inline __m256 masked_out8(const bool* p) {
  return _mm256_andnot_ps(load_mask8(p), _mm256_castsi256_ps(_mm256_set1_epi32(-1)));
}
// Lanes holding NaN or +inf.
inline __m256 nan_or_pos_inf(__m256 x) {
  return _mm256_cmp_ps(x, _mm256_set1_ps(__builtin_inff()), _CMP_NLT_UQ);
}
inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
// Lane sum in a fixed order (so the result never depends on anything but the 8 values).
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

CM3LEON_ISA_END
}  // namespace cm3leon::sampling::simd
