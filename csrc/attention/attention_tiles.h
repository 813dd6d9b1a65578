// Building blocks shared by the attention kernels (internal, torch-free): the register-blocked 6x16
// micro-kernel, a vectorised exp2, and packing of bf16/fp16/fp32 rows into fp32 operand panels.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "common/half.h"
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define CM3LEON_ATTN_AVX2 1
#endif

namespace cm3leon::attention {

constexpr int64_t MR = 6;   // rows of the micro-kernel's output tile
constexpr int64_t NR = 16;  // columns (two AVX registers)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// c[r * ldc + j] (+)= sum_p a[p * MR + r] * b[p * ldb + j] for r < 6, j < 16.
// `a` is a packed panel (six rows interleaved per depth step); `b` is any row-major fp32 block.
inline void micro_6x16(const float* a, const float* b, int64_t ldb, int64_t depth, float* c, int64_t ldc,
                       bool accumulate) {
#if CM3LEON_ATTN_AVX2
  // Twelve named accumulators + two b vectors + one broadcast = 15 of 16 ymm registers (arrays spill).
  __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (accumulate) {
    c00 = _mm256_loadu_ps(c + 0 * ldc); c01 = _mm256_loadu_ps(c + 0 * ldc + 8);
    c10 = _mm256_loadu_ps(c + 1 * ldc); c11 = _mm256_loadu_ps(c + 1 * ldc + 8);
    c20 = _mm256_loadu_ps(c + 2 * ldc); c21 = _mm256_loadu_ps(c + 2 * ldc + 8);
    c30 = _mm256_loadu_ps(c + 3 * ldc); c31 = _mm256_loadu_ps(c + 3 * ldc + 8);
    c40 = _mm256_loadu_ps(c + 4 * ldc); c41 = _mm256_loadu_ps(c + 4 * ldc + 8);
    c50 = _mm256_loadu_ps(c + 5 * ldc); c51 = _mm256_loadu_ps(c + 5 * ldc + 8);
  } else {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm256_setzero_ps();
  }
  for (int64_t p = 0; p < depth; ++p, a += MR, b += ldb) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 ar;
    ar = _mm256_broadcast_ss(a + 0); c00 = _mm256_fmadd_ps(ar, b0, c00); c01 = _mm256_fmadd_ps(ar, b1, c01);
    ar = _mm256_broadcast_ss(a + 1); c10 = _mm256_fmadd_ps(ar, b0, c10); c11 = _mm256_fmadd_ps(ar, b1, c11);
    ar = _mm256_broadcast_ss(a + 2); c20 = _mm256_fmadd_ps(ar, b0, c20); c21 = _mm256_fmadd_ps(ar, b1, c21);
    ar = _mm256_broadcast_ss(a + 3); c30 = _mm256_fmadd_ps(ar, b0, c30); c31 = _mm256_fmadd_ps(ar, b1, c31);
    ar = _mm256_broadcast_ss(a + 4); c40 = _mm256_fmadd_ps(ar, b0, c40); c41 = _mm256_fmadd_ps(ar, b1, c41);
    ar = _mm256_broadcast_ss(a + 5); c50 = _mm256_fmadd_ps(ar, b0, c50); c51 = _mm256_fmadd_ps(ar, b1, c51);
  }
  _mm256_storeu_ps(c + 0 * ldc, c00); _mm256_storeu_ps(c + 0 * ldc + 8, c01);
  _mm256_storeu_ps(c + 1 * ldc, c10); _mm256_storeu_ps(c + 1 * ldc + 8, c11);
  _mm256_storeu_ps(c + 2 * ldc, c20); _mm256_storeu_ps(c + 2 * ldc + 8, c21);
  _mm256_storeu_ps(c + 3 * ldc, c30); _mm256_storeu_ps(c + 3 * ldc + 8, c31);
  _mm256_storeu_ps(c + 4 * ldc, c40); _mm256_storeu_ps(c + 4 * ldc + 8, c41);
  _mm256_storeu_ps(c + 5 * ldc, c50); _mm256_storeu_ps(c + 5 * ldc + 8, c51);
#else
  float acc[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) acc[r][j] = accumulate ? c[r * ldc + j] : 0.f;
  for (int64_t p = 0; p < depth; ++p)
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j) acc[r][j] += a[p * MR + r] * b[p * ldb + j];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) c[r * ldc + j] = acc[r][j];
#endif
}

// C[rows_pad x cols_pad] (+)= A . B with A packed as row panels ([rows_pad / 6][depth][6]) and B row-major
// [depth][ldb]; cols_pad is a multiple of 16, rows_pad of 6.
inline void panel_gemm(const float* a, int64_t rows_pad, const float* b, int64_t ldb, int64_t cols_pad,
                       int64_t depth, float* c, int64_t ldc, bool accumulate) {
  for (int64_t rp = 0; rp < rows_pad; rp += MR)
    for (int64_t j = 0; j < cols_pad; j += NR)
      micro_6x16(a + rp * depth, b + j, ldb, depth, c + rp * ldc + j, ldc, accumulate);
}

#if CM3LEON_ATTN_AVX2
// 2^x for x <= 0 (scores minus their running max); x below -126 (and -inf) gives exactly 0.
inline __m256 exp2_neg(__m256 x) {
  const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-126.f), _CMP_GE_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-126.f));
  const __m256 xi = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, xi);  // [-0.5, 0.5]
  // Taylor series of 2^f = e^(f ln2) to degree 7: relative error < 1e-8 on [-0.5, 0.5].
  __m256 poly = _mm256_set1_ps(1.5252733804059841e-05f);
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(1.5403530393381608e-04f));
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(1.3333558146428443e-03f));
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(9.6181291076284772e-03f));
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(5.5504108664821580e-02f));
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(2.4022650695910071e-01f));
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(6.9314718055994531e-01f));
  poly = _mm256_fmadd_ps(poly, f, _mm256_set1_ps(1.f));
  const __m256i exponent = _mm256_slli_epi32(_mm256_cvtps_epi32(xi), 23);
  const __m256 scaled = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(poly), exponent));
  return _mm256_and_ps(scaled, underflow);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Eight consecutive elements widened to fp32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const fp16* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

// Row max over n (multiple of 8) values; and the in-place p = 2^(x - m) with its sum.
inline float row_max(const float* x, int64_t n) {
#if CM3LEON_ATTN_AVX2
  __m256 m = _mm256_set1_ps(kNegInf);
  for (int64_t j = 0; j < n; j += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + j));
  return hmax(m);
#else
  float m = kNegInf;
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
#endif
}

inline float exp2_shifted_sum(float* x, int64_t n, float m) {
#if CM3LEON_ATTN_AVX2
  const __m256 mv = _mm256_set1_ps(m);
  __m256 s = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 p = exp2_neg(_mm256_sub_ps(_mm256_loadu_ps(x + j), mv));
    _mm256_storeu_ps(x + j, p);
    s = _mm256_add_ps(s, p);
  }
  return hsum(s);
#else
  float s = 0.f;
  for (int64_t j = 0; j < n; ++j) { x[j] = std::exp2(x[j] - m); s += x[j]; }
  return s;
#endif
}

inline void scale_row(float* x, int64_t n, float a) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

// rows x d elements of a token-major tensor (row stride `stride`) -> fp32 row-major [rows_pad][dp] times
// `scale`, zero padding up to rows_pad rows and dp columns.
template <typename T>
void pack_rows(const T* src, int64_t stride, int64_t rows, int64_t d, float scale, int64_t rows_pad,
               int64_t dp, float* dst) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    float* out = dst + r * dp;
    int64_t i = 0;
    if (r < rows) {
      const T* in = src + r * stride;
#if CM3LEON_ATTN_AVX2
      const __m256 sv = _mm256_set1_ps(scale);
      for (; i + 8 <= d; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(load8(in + i), sv));
#endif
      for (; i < d; ++i) out[i] = to_float(in[i]) * scale;
    }
    for (; i < dp; ++i) out[i] = 0.f;
  }
}

// The same rows packed as panels of `pr` rows: dst[rows_pad / pr][dp][pr] (the micro-kernel's operand).
template <typename T>
void pack_panels(const T* src, int64_t stride, int64_t rows, int64_t d, float scale, int64_t pr,
                 int64_t rows_pad, int64_t dp, float* dst) {
  for (int64_t r0 = 0; r0 < rows_pad; r0 += pr) {
    float* panel = dst + r0 * dp;
    for (int64_t r = 0; r < pr; ++r) {
      const int64_t row = r0 + r;
      if (row < rows) {
        const T* in = src + row * stride;
        for (int64_t i = 0; i < d; ++i) panel[i * pr + r] = to_float(in[i]) * scale;
        for (int64_t i = d; i < dp; ++i) panel[i * pr + r] = 0.f;
      } else {
        for (int64_t i = 0; i < dp; ++i) panel[i * pr + r] = 0.f;
      }
    }
  }
}

// Visible keys of query row i: causal masks align to the bottom-right corner.
inline int64_t visible_keys(int64_t i, int64_t q_len, int64_t k_len, bool causal) {
  if (!causal) return k_len;
  return std::clamp<int64_t>(i + k_len - q_len + 1, 0, k_len);
}

}  // namespace cm3leon::attention
