// Vector building blocks shared by the CPU kernels (torch-free, header-only). CM3LEON_AVX2 is defined when the
// kernels are compiled for a CPU with AVX2, FMA and F16C; every user keeps a scalar path for the others.
//
// Two widths: Ymm (8 fp32 lanes, AVX2) everywhere CM3LEON_AVX2 is, and Zmm (16 lanes) in AVX-512 objects.
// `Wide` is the widest of the level. A kernel body written once against a width W (W::V values, W::load,
// W::set1, and the overloaded operations below, which take either width) runs 8 lanes at the AVX2 level and
// 16 at the AVX-512 ones, with the same operations in the same order per lane. Comparisons give a W::Mask: a
// lane-wide bit pattern on Ymm, an AVX-512 mask register on Zmm; `select` and `keep` consume either.
#pragma once
#include "common/isa.h"
#include "common/half.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#include <cstdint>
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

struct Ymm {
  using V = __m256;
  using Mask = __m256;  // all-ones lanes where true
  static constexpr int64_t kLanes = 8;
  template <typename T>
  static V load(const T* p) { return load8(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V zero() { return _mm256_setzero_ps(); }
};

inline __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
inline __m256 sub(__m256 a, __m256 b) { return _mm256_sub_ps(a, b); }
inline __m256 mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
inline __m256 div(__m256 a, __m256 b) { return _mm256_div_ps(a, b); }
inline __m256 max(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }
inline __m256 fmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }   // a b + c
inline __m256 fnmadd(__m256 a, __m256 b, __m256 c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a b
inline __m256 fmsub(__m256 a, __m256 b, __m256 c) { return _mm256_fmsub_ps(a, b, c); }    // a b - c
inline __m256 abs(__m256 a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
inline __m256 copysign(__m256 magnitude, __m256 sign) {  // magnitude >= 0
  return _mm256_or_ps(magnitude, _mm256_and_ps(sign, _mm256_set1_ps(-0.f)));
}
inline __m256 round_nearest(__m256 a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// a * 2^n for integral n (as floats) when the result is a normal number: n is added to the exponent field.
inline __m256 scale_by_pow2(__m256 a, __m256 n) {
  const __m256i e = _mm256_slli_epi32(_mm256_cvtps_epi32(n), 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(a), e));
}
inline __m256 lt(__m256 a, __m256 b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
inline __m256 ge(__m256 a, __m256 b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
inline __m256 eq(__m256 a, __m256 b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
inline __m256 is_nan(__m256 a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
inline __m256 both(__m256 m1, __m256 m2) { return _mm256_and_ps(m1, m2); }
inline __m256 select(__m256 mask, __m256 if_true, __m256 if_false) { return _mm256_blendv_ps(if_false, if_true, mask); }
inline __m256 keep(__m256 mask, __m256 a) { return _mm256_and_ps(a, mask); }  // a where mask, else 0
inline __m256 fold8(__m256 a) { return a; }  // to eight lanes whose sum is the sum of a's lanes

#if defined(__AVX512F__) && defined(__AVX512DQ__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define CM3LEON_AVX512 1

struct Zmm {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr int64_t kLanes = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V load(const bf16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static V load(const fp16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static V zero() { return _mm512_setzero_ps(); }
};

inline __m512 add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
inline __m512 sub(__m512 a, __m512 b) { return _mm512_sub_ps(a, b); }
inline __m512 mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
inline __m512 div(__m512 a, __m512 b) { return _mm512_div_ps(a, b); }
inline __m512 max(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }
inline __m512 fmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
inline __m512 fnmadd(__m512 a, __m512 b, __m512 c) { return _mm512_fnmadd_ps(a, b, c); }
inline __m512 fmsub(__m512 a, __m512 b, __m512 c) { return _mm512_fmsub_ps(a, b, c); }
inline __m512 abs(__m512 a) { return _mm512_andnot_ps(_mm512_set1_ps(-0.f), a); }
inline __m512 copysign(__m512 magnitude, __m512 sign) {
  return _mm512_or_ps(magnitude, _mm512_and_ps(sign, _mm512_set1_ps(-0.f)));
}
inline __m512 round_nearest(__m512 a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline __m512 scale_by_pow2(__m512 a, __m512 n) {
  const __m512i e = _mm512_slli_epi32(_mm512_cvtps_epi32(n), 23);
  return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), e));
}
inline __mmask16 lt(__m512 a, __m512 b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
inline __mmask16 ge(__m512 a, __m512 b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
inline __mmask16 eq(__m512 a, __m512 b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
inline __mmask16 is_nan(__m512 a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
// (__mmask16 is an integer type: the Zmm overloads that take masks carry the vector too, so an AVX2 Mask
// can never bind to them.)
inline __mmask16 both(__mmask16 m1, __mmask16 m2) { return __mmask16(m1 & m2); }
inline __m512 select(__mmask16 mask, __m512 if_true, __m512 if_false) { return _mm512_mask_blend_ps(mask, if_false, if_true); }
inline __m512 keep(__mmask16 mask, __m512 a) { return _mm512_maskz_mov_ps(mask, a); }
inline __m256 fold8(__m512 a) { return _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1)); }
// Each lane rounded to bf16 as from_float does (nearest even, NaN to the quiet NaN), the bits in the low half
// of the lane. Integer arithmetic, so subnormals round like every other value (vcvtneps2bf16 flushes them).
inline __m512i bf16_bits(__m512 a) {
  const __m512i u = _mm512_castps_si512(a);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7fff));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  return _mm512_mask_blend_epi32(is_nan(a), rounded, _mm512_set1_epi32(0x7fc0));
}

// Transposes a 16 x 16 block of 32-bit elements held as 16 rows: pairs of rows interleaved, then pairs of
// pairs, then whole 128-bit lanes regrouped in two steps; afterwards v[c] is column c.
inline void transpose_16x16(__m512i v[16]) {
  __m512i t[16];
  for (int k = 0; k < 16; k += 2) {  // t[k], t[k + 1]: columns {0, 1} and {2, 3} of each lane, rows k, k + 1
    t[k] = _mm512_unpacklo_epi32(v[k], v[k + 1]);
    t[k + 1] = _mm512_unpackhi_epi32(v[k], v[k + 1]);
  }
  for (int k = 0; k < 16; k += 4) {  // v[k + j]: column j of each lane, rows k..k + 3
    v[k] = _mm512_unpacklo_epi64(t[k], t[k + 2]);
    v[k + 1] = _mm512_unpackhi_epi64(t[k], t[k + 2]);
    v[k + 2] = _mm512_unpacklo_epi64(t[k + 1], t[k + 3]);
    v[k + 3] = _mm512_unpackhi_epi64(t[k + 1], t[k + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // lanes 0 and 2, 1 and 3 of rows 0-7 and 8-15, then whole columns
    const __m512i even_a = _mm512_shuffle_i32x4(v[j], v[4 + j], 0x88);
    const __m512i odd_a = _mm512_shuffle_i32x4(v[j], v[4 + j], 0xdd);
    const __m512i even_b = _mm512_shuffle_i32x4(v[8 + j], v[12 + j], 0x88);
    const __m512i odd_b = _mm512_shuffle_i32x4(v[8 + j], v[12 + j], 0xdd);
    t[j] = _mm512_shuffle_i32x4(even_a, even_b, 0x88);       // column j (lane 0)
    t[8 + j] = _mm512_shuffle_i32x4(even_a, even_b, 0xdd);   // column 8 + j (lane 2)
    t[4 + j] = _mm512_shuffle_i32x4(odd_a, odd_b, 0x88);     // column 4 + j (lane 1)
    t[12 + j] = _mm512_shuffle_i32x4(odd_a, odd_b, 0xdd);    // column 12 + j (lane 3)
  }
  for (int k = 0; k < 16; ++k) v[k] = t[k];
}

using Wide = Zmm;
#else
using Wide = Ymm;
#endif

// 2^x for x <= 0 (scores minus their running max); x below -126 (and -inf) gives exactly 0, NaN stays NaN
// (a NaN score must poison its row, as in PyTorch, not vanish).
template <typename W>
inline typename W::V exp2_neg(typename W::V x) {
  const auto nan = is_nan(x);
  const auto normal = ge(x, W::set1(-126.f));
  const typename W::V xc = max(x, W::set1(-126.f)), xi = round_nearest(xc), f = sub(xc, xi);  // f in [-0.5, 0.5]
  // Taylor series of 2^f = e^(f ln2) to degree 7: relative error < 1e-8 on [-0.5, 0.5].
  typename W::V poly = W::set1(1.5252733804059841e-05f);
  poly = fmadd(poly, f, W::set1(1.5403530393381608e-04f));
  poly = fmadd(poly, f, W::set1(1.3333558146428443e-03f));
  poly = fmadd(poly, f, W::set1(9.6181291076284772e-03f));
  poly = fmadd(poly, f, W::set1(5.5504108664821580e-02f));
  poly = fmadd(poly, f, W::set1(2.4022650695910071e-01f));
  poly = fmadd(poly, f, W::set1(6.9314718055994531e-01f));
  poly = fmadd(poly, f, W::set1(1.f));
  return select(nan, x, keep(normal, scale_by_pow2(poly, xi)));
}

CM3LEON_ISA_END
}  // namespace cm3leon
#endif
