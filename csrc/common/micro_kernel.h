// The register-blocked fp32 micro-kernel shared by the CPU kernels (VQ search, attention forward and
// backward, the fused loss): the innermost loop of every small GEMM they run, its bf16-pair overload and the
// packing and rounding of bf16-pair operands. Torch-free, header-only.
//
// The tile is kMicroRows x kMicroCols and depends on the level the including object is compiled for:
// 6 x 16 with AVX2 (two ymm per row) and 6 x 32 with AVX-512 (two zmm per row); 12 accumulators either way.
// Callers size their blocks and packed layouts with these constants (blocks that are multiples of 96 rows
// or columns suit both), never with literal 16s, so one kernel body serves every level.
#pragma once
#include "common/isa.h"
#include <cstdint>

#include "common/simd.h"

namespace cm3leon {
CM3LEON_ISA_BEGIN

constexpr int64_t kMicroRows = 6;  // rows of the output tile
#if CM3LEON_AVX2
constexpr int64_t kMicroCols = 2 * Wide::kLanes;  // columns (two vector registers)
#else
constexpr int64_t kMicroCols = 16;
#endif

// c[r * ldc + j] (+)= sum_p a[p * lda + r * ars] * b[p * ldb + j] for r < kMicroRows, j < kMicroCols.
// The six A values of a depth step are `ars` apart and steps are `lda` apart: a packed panel (lda = 6,
// ars = 1), six columns of a row-major block (lda = its row length, ars = 1), or six rows of one
// (lda = 1, ars = row length). `b` is any row-major fp32 block.
inline void micro_tile(const float* a, int64_t lda, int64_t ars, const float* b, int64_t ldb, int64_t depth,
                       float* c, int64_t ldc, bool accumulate) {
#if CM3LEON_AVX2
  using Vec = Wide::V;
  constexpr int64_t kWidth = Wide::kLanes;
  const auto load = [](const float* p) { return Wide::load(p); };
  const auto store = [](float* p, Vec v) { Wide::store(p, v); };
  // Twelve named accumulators + two b vectors + one broadcast: 15 registers (arrays would spill on AVX2).
  Vec c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (accumulate) {
    c00 = load(c + 0 * ldc); c01 = load(c + 0 * ldc + kWidth);
    c10 = load(c + 1 * ldc); c11 = load(c + 1 * ldc + kWidth);
    c20 = load(c + 2 * ldc); c21 = load(c + 2 * ldc + kWidth);
    c30 = load(c + 3 * ldc); c31 = load(c + 3 * ldc + kWidth);
    c40 = load(c + 4 * ldc); c41 = load(c + 4 * ldc + kWidth);
    c50 = load(c + 5 * ldc); c51 = load(c + 5 * ldc + kWidth);
  } else {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = Wide::zero();
  }
  const int64_t a1 = ars, a2 = 2 * ars, a3 = 3 * ars, a4 = 4 * ars, a5 = 5 * ars;
  for (int64_t p = 0; p < depth; ++p, a += lda, b += ldb) {
    const Vec b0 = load(b), b1 = load(b + kWidth);
    Vec ar;
    ar = Wide::broadcast(a); c00 = fmadd(ar, b0, c00); c01 = fmadd(ar, b1, c01);
    ar = Wide::broadcast(a + a1); c10 = fmadd(ar, b0, c10); c11 = fmadd(ar, b1, c11);
    ar = Wide::broadcast(a + a2); c20 = fmadd(ar, b0, c20); c21 = fmadd(ar, b1, c21);
    ar = Wide::broadcast(a + a3); c30 = fmadd(ar, b0, c30); c31 = fmadd(ar, b1, c31);
    ar = Wide::broadcast(a + a4); c40 = fmadd(ar, b0, c40); c41 = fmadd(ar, b1, c41);
    ar = Wide::broadcast(a + a5); c50 = fmadd(ar, b0, c50); c51 = fmadd(ar, b1, c51);
  }
  store(c + 0 * ldc, c00); store(c + 0 * ldc + kWidth, c01);
  store(c + 1 * ldc, c10); store(c + 1 * ldc + kWidth, c11);
  store(c + 2 * ldc, c20); store(c + 2 * ldc + kWidth, c21);
  store(c + 3 * ldc, c30); store(c + 3 * ldc + kWidth, c31);
  store(c + 4 * ldc, c40); store(c + 4 * ldc + kWidth, c41);
  store(c + 5 * ldc, c50); store(c + 5 * ldc + kWidth, c51);
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

// Operands as bf16 pairs (two depth steps per uint32, bf16_pair) for micro_tile's pair overload and AMX tiles,
// values as given; zero pairs past d (dp, the padded depth, is even) and past `rows`.
// pack_pair_rows: rows x d (row stride `stride`) -> [rows_pad][dp / 2], pairs along each row.
inline void pack_pair_rows(const bf16* src, int64_t stride, int64_t rows, int64_t d, int64_t rows_pad, int64_t dp,
                           uint32_t* dst) {
  for (int64_t r = 0; r < rows_pad; ++r)
    for (int64_t p = 0; p < dp / 2; ++p) dst[r * (dp / 2) + p] = r < rows ? bf16_pair(src + r * stride, 2 * p, d) : 0u;
}

// pack_pair_panels: the same rows in panels of `panel` rows, [rows_pad / panel][dp / 2][panel] (a transposed
// operand: one pair of each of the panel's rows per depth step).
inline void pack_pair_panels(const bf16* src, int64_t stride, int64_t rows, int64_t d, int64_t panel,
                             int64_t rows_pad, int64_t dp, uint32_t* dst) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    uint32_t* out = dst + (r / panel) * panel * (dp / 2) + r % panel;
    for (int64_t p = 0; p < dp / 2; ++p) out[p * panel] = r < rows ? bf16_pair(src + r * stride, 2 * p, d) : 0u;
  }
}

// pack_pair_strips: the layout of attention's pack_strips (kMicroCols-column strips per block of `block`
// rows) with pairs of *rows* (rows 2i and 2i + 1 of a block) per element,
// dst[rows_pad / block][dp / kMicroCols][block / 2][kMicroCols] (V as the B operand of O += P V); `block` is
// even.
inline void pack_pair_strips(const bf16* src, int64_t stride, int64_t rows, int64_t d, int64_t rows_pad,
                             int64_t block, int64_t dp, uint32_t* dst) {
  for (int64_t r = 0; r < rows_pad; r += 2) {
    uint32_t* out = dst + (r / block) * block * dp / 2 + (r % block) / 2 * kMicroCols;
    for (int64_t c = 0; c < dp; ++c) {
      const uint32_t lo = r < rows && c < d ? src[r * stride + c].bits : 0u;
      const uint32_t hi = r + 1 < rows && c < d ? src[(r + 1) * stride + c].bits : 0u;
      out[(c / kMicroCols) * block / 2 * kMicroCols + c % kMicroCols] = lo | hi << 16;
    }
  }
}

// fp32 values rounded to bf16 pairs (from_float's rounding): dst[j] = bf16_pair(a[j], b[j]) for j < n (two
// rows of a tile paired element by element) ...
inline void round_pairs(const float* a, const float* b, int64_t n, uint32_t* dst) {
  int64_t j = 0;
#if CM3LEON_AVX512
  for (; j + 16 <= n; j += 16) {
    const __m512i lo = bf16_bits(_mm512_loadu_ps(a + j)), hi = bf16_bits(_mm512_loadu_ps(b + j));
    _mm512_storeu_si512(dst + j, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
  }
#endif
  for (; j < n; ++j) dst[j] = bf16_pair(a[j], b[j]);
}

// ... and dst[j] = bf16_pair(src[2j], src[2j + 1]) for j < n / 2, n even (neighbours paired: a tile whose rows
// are the depth of the next product, stored as its rows of pairs).
inline void round_neighbour_pairs(const float* src, int64_t n, uint32_t* dst) {
  int64_t j = 0;
#if CM3LEON_AVX512
  // 32 values per step: packus narrows each 128-bit lane's four values of either half (lane by lane, hence
  // the permutation of 64-bit groups back into order).
  const __m512i order = _mm512_setr_epi64(0, 2, 4, 6, 1, 3, 5, 7);
  for (; j + 32 <= n; j += 32) {
    const __m512i narrow = _mm512_packus_epi32(bf16_bits(_mm512_loadu_ps(src + j)),
                                               bf16_bits(_mm512_loadu_ps(src + j + 16)));
    _mm512_storeu_si512(dst + j / 2, _mm512_permutexvar_epi64(order, narrow));
  }
#endif
  for (; j < n; j += 2) dst[j / 2] = bf16_pair(src[j], src[j + 1]);
}

// Rows 2i and 2i + 1 of an fp32 tile (row stride ld) rounded to bf16 pairs: dst[i * ld + c] for i < rows / 2
// (rows even), c < cols (P^T as the A operand of O += P V).
inline void round_row_pairs(const float* src, int64_t ld, int64_t rows, int64_t cols, uint32_t* dst) {
  for (int64_t i = 0; i < rows / 2; ++i) round_pairs(src + 2 * i * ld, src + (2 * i + 1) * ld, cols, dst + i * ld);
}

// The transpose of round_row_pairs for the AMX A operand: dst[c * ldd + i] = pair of rows 2i, 2i + 1 of
// column c, for c < cols and i < rows_pad / 2; rows at or past `rows` count as 0.
inline void round_col_pairs(const float* src, int64_t ld, int64_t rows, int64_t rows_pad, int64_t cols,
                            uint32_t* dst, int64_t ldd) {
  int64_t c0 = 0;
#if CM3LEON_AVX512
  // 16 pair rows x 16 columns at a time: the pairs as 16 vectors (one per pair row), transposed in registers.
  if (rows_pad % 32 == 0)
    for (; c0 + 16 <= cols; c0 += 16)
      for (int64_t i0 = 0; i0 < rows_pad / 2; i0 += 16) {
        __m512i v[16];
        for (int k = 0; k < 16; ++k) {
          const int64_t r = 2 * (i0 + k);
          const __m512 lo = r < rows ? _mm512_loadu_ps(src + r * ld + c0) : _mm512_setzero_ps();
          const __m512 hi = r + 1 < rows ? _mm512_loadu_ps(src + (r + 1) * ld + c0) : _mm512_setzero_ps();
          v[k] = _mm512_or_si512(bf16_bits(lo), _mm512_slli_epi32(bf16_bits(hi), 16));
        }
        transpose_16x16(v);
        for (int k = 0; k < 16; ++k) _mm512_storeu_si512(dst + (c0 + k) * ldd + i0, v[k]);
      }
#endif
  for (int64_t c = c0; c < cols; ++c)
    for (int64_t i = 0; i < rows_pad / 2; ++i)
      dst[c * ldd + i] = bf16_pair(2 * i < rows ? src[2 * i * ld + c] : 0.f,
                                   2 * i + 1 < rows ? src[(2 * i + 1) * ld + c] : 0.f);
}

#if defined(__AVX512BF16__) && defined(__AVX512F__)
// The same tile from bf16 operands with the AVX-512 BF16 dot-product instruction (vdpbf16ps), as an overload
// so that a kernel body written against its packed word type (float, or uint32_t pairs) serves both: each
// depth step is a *pair* of bf16 values packed in one uint32 (element 2p in the low half, 2p + 1 in the high
// half), both products are exact in fp32 and accumulate in fp32, at twice the fp32 rate. `a` and `b` hold
// pairs with the micro_tile layout (strides in pairs):
// c[r * ldc + j] (+)= sum_p dot(a[p * lda + r * ars], b[p * ldb + j]).
// Subnormal bf16 inputs count as zero (the instruction's rule).
constexpr bool kHasBf16Dot = true;
inline void micro_tile(const uint32_t* a, int64_t lda, int64_t ars, const uint32_t* b, int64_t ldb,
                       int64_t pairs, float* c, int64_t ldc, bool accumulate) {
  static_assert(kMicroCols == 32, "two zmm of pairs per tile row");
  __m512 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
  if (accumulate) {
    c00 = _mm512_loadu_ps(c + 0 * ldc); c01 = _mm512_loadu_ps(c + 0 * ldc + 16);
    c10 = _mm512_loadu_ps(c + 1 * ldc); c11 = _mm512_loadu_ps(c + 1 * ldc + 16);
    c20 = _mm512_loadu_ps(c + 2 * ldc); c21 = _mm512_loadu_ps(c + 2 * ldc + 16);
    c30 = _mm512_loadu_ps(c + 3 * ldc); c31 = _mm512_loadu_ps(c + 3 * ldc + 16);
    c40 = _mm512_loadu_ps(c + 4 * ldc); c41 = _mm512_loadu_ps(c + 4 * ldc + 16);
    c50 = _mm512_loadu_ps(c + 5 * ldc); c51 = _mm512_loadu_ps(c + 5 * ldc + 16);
  } else {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = c40 = c41 = c50 = c51 = _mm512_setzero_ps();
  }
  const int64_t a1 = ars, a2 = 2 * ars, a3 = 3 * ars, a4 = 4 * ars, a5 = 5 * ars;
  for (int64_t p = 0; p < pairs; ++p, a += lda, b += ldb) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b), b1 = (__m512bh)_mm512_loadu_si512(b + 16);
    __m512bh ar;
    ar = (__m512bh)_mm512_set1_epi32(int(a[0])); c00 = _mm512_dpbf16_ps(c00, ar, b0); c01 = _mm512_dpbf16_ps(c01, ar, b1);
    ar = (__m512bh)_mm512_set1_epi32(int(a[a1])); c10 = _mm512_dpbf16_ps(c10, ar, b0); c11 = _mm512_dpbf16_ps(c11, ar, b1);
    ar = (__m512bh)_mm512_set1_epi32(int(a[a2])); c20 = _mm512_dpbf16_ps(c20, ar, b0); c21 = _mm512_dpbf16_ps(c21, ar, b1);
    ar = (__m512bh)_mm512_set1_epi32(int(a[a3])); c30 = _mm512_dpbf16_ps(c30, ar, b0); c31 = _mm512_dpbf16_ps(c31, ar, b1);
    ar = (__m512bh)_mm512_set1_epi32(int(a[a4])); c40 = _mm512_dpbf16_ps(c40, ar, b0); c41 = _mm512_dpbf16_ps(c41, ar, b1);
    ar = (__m512bh)_mm512_set1_epi32(int(a[a5])); c50 = _mm512_dpbf16_ps(c50, ar, b0); c51 = _mm512_dpbf16_ps(c51, ar, b1);
  }
  _mm512_storeu_ps(c + 0 * ldc, c00); _mm512_storeu_ps(c + 0 * ldc + 16, c01);
  _mm512_storeu_ps(c + 1 * ldc, c10); _mm512_storeu_ps(c + 1 * ldc + 16, c11);
  _mm512_storeu_ps(c + 2 * ldc, c20); _mm512_storeu_ps(c + 2 * ldc + 16, c21);
  _mm512_storeu_ps(c + 3 * ldc, c30); _mm512_storeu_ps(c + 3 * ldc + 16, c31);
  _mm512_storeu_ps(c + 4 * ldc, c40); _mm512_storeu_ps(c + 4 * ldc + 16, c41);
  _mm512_storeu_ps(c + 5 * ldc, c50); _mm512_storeu_ps(c + 5 * ldc + 16, c51);
}
#else
constexpr bool kHasBf16Dot = false;  // levels without vdpbf16ps widen bf16 to fp32 and use micro_tile
// Declared (never defined) for branches that kHasBf16Dot discards; a call that survived would not link.
void micro_tile(const uint32_t* a, int64_t lda, int64_t ars, const uint32_t* b, int64_t ldb, int64_t pairs,
                float* c, int64_t ldc, bool accumulate);
#endif

CM3LEON_ISA_END
}  // namespace cm3leon
