// The register-blocked 6x16 fp32 micro-kernel shared by the CPU kernels (VQ search, attention forward and
// backward): the innermost loop of every small GEMM they run. Torch-free, header-only.
#pragma once
#include <cstdint>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace cm3leon {

constexpr int64_t kMicroRows = 6;   // rows of the output tile
constexpr int64_t kMicroCols = 16;  // columns (two AVX registers)

// c[r * ldc + j] (+)= sum_p a[p * lda + r * ars] * b[p * ldb + j] for r < 6, j < 16.
// The six A values of a depth step are `ars` apart and steps are `lda` apart: a packed panel (lda = 6,
// ars = 1), six columns of a row-major block (lda = its row length, ars = 1), or six rows of one
// (lda = 1, ars = row length). `b` is any row-major fp32 block.
inline void micro_6x16(const float* a, int64_t lda, int64_t ars, const float* b, int64_t ldb, int64_t depth,
                       float* c, int64_t ldc, bool accumulate) {
#if defined(__AVX2__) && defined(__FMA__)
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
  const int64_t a1 = ars, a2 = 2 * ars, a3 = 3 * ars, a4 = 4 * ars, a5 = 5 * ars;
  for (int64_t p = 0; p < depth; ++p, a += lda, b += ldb) {
    const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
    __m256 ar;
    ar = _mm256_broadcast_ss(a); c00 = _mm256_fmadd_ps(ar, b0, c00); c01 = _mm256_fmadd_ps(ar, b1, c01);
    ar = _mm256_broadcast_ss(a + a1); c10 = _mm256_fmadd_ps(ar, b0, c10); c11 = _mm256_fmadd_ps(ar, b1, c11);
    ar = _mm256_broadcast_ss(a + a2); c20 = _mm256_fmadd_ps(ar, b0, c20); c21 = _mm256_fmadd_ps(ar, b1, c21);
    ar = _mm256_broadcast_ss(a + a3); c30 = _mm256_fmadd_ps(ar, b0, c30); c31 = _mm256_fmadd_ps(ar, b1, c31);
    ar = _mm256_broadcast_ss(a + a4); c40 = _mm256_fmadd_ps(ar, b0, c40); c41 = _mm256_fmadd_ps(ar, b1, c41);
    ar = _mm256_broadcast_ss(a + a5); c50 = _mm256_fmadd_ps(ar, b0, c50); c51 = _mm256_fmadd_ps(ar, b1, c51);
  }
  _mm256_storeu_ps(c + 0 * ldc, c00); _mm256_storeu_ps(c + 0 * ldc + 8, c01);
  _mm256_storeu_ps(c + 1 * ldc, c10); _mm256_storeu_ps(c + 1 * ldc + 8, c11);
  _mm256_storeu_ps(c + 2 * ldc, c20); _mm256_storeu_ps(c + 2 * ldc + 8, c21);
  _mm256_storeu_ps(c + 3 * ldc, c30); _mm256_storeu_ps(c + 3 * ldc + 8, c31);
  _mm256_storeu_ps(c + 4 * ldc, c40); _mm256_storeu_ps(c + 4 * ldc + 8, c41);
  _mm256_storeu_ps(c + 5 * ldc, c50); _mm256_storeu_ps(c + 5 * ldc + 8, c51);
#else
  float acc[kMicroRows][kMicroCols];
  for (int r = 0; r < kMicroRows; ++r)
    for (int j = 0; j < kMicroCols; ++j) acc[r][j] = accumulate ? c[r * ldc + j] : 0.f;
  for (int64_t p = 0; p < depth; ++p)
    for (int r = 0; r < kMicroRows; ++r)
      for (int j = 0; j < kMicroCols; ++j) acc[r][j] += a[p * lda + r * ars] * b[p * ldb + j];
  for (int r = 0; r < kMicroRows; ++r)
    for (int j = 0; j < kMicroCols; ++j) c[r * ldc + j] = acc[r][j];
#endif
}

}  // namespace cm3leon
