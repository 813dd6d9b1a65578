// Building blocks shared by the attention kernels (internal, torch-free): a vectorised exp2 and tanh, packing
// of bf16/fp16/fp32 rows into fp32 operands (the micro-kernel lives in common/micro_kernel.h), the visible key
// range of a query and the softcap / ALiBi score modifiers.
#pragma once
#include "common/isa.h"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "attention/attention_cpu.h"
#include "common/amx.h"
#include "common/half.h"
#include "common/micro_kernel.h"
#include "common/simd.h"

namespace cm3leon::attention {
CM3LEON_ISA_BEGIN

using cm3leon::micro_tile;
constexpr int64_t MR = kMicroRows;
constexpr int64_t NR = kMicroCols;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// bf16 inputs at levels with bf16 dot products take the forward's products from bf16 pairs (vdpbf16ps at twice
// the fp32 rate, or AMX tiles): S^T = K Q^T from Q and K as given (exact products, then the scale in fp32),
// O += P V with P rounded to bf16 (as FlashAttention's GPU kernels do); the softmax and the accumulators stay
// fp32. The backward recomputes S^T the same way (bit for bit the forward's scores).
template <typename T>
constexpr bool kBf16Pairs = std::is_same_v<T, bf16> && (kHasBf16Dot || kAmx);

#if CM3LEON_AVX2
// e^(x - ref) for x <= ref (scores and the row's max or log-sum-exp, natural units). The difference is taken
// before the change of base, so x == ref gives exactly 1: a row's only key gets P = 1 in the forward and,
// from the saved lse, in the backward (converting lse to base 2 and back would not round-trip).
template <typename W>
inline typename W::V exp_diff(typename W::V x, typename W::V ref) {
  return exp2_neg<W>(mul(sub(x, ref), W::set1(kLog2e)));
}

// tanh(x), relative error < 1e-7: an odd Taylor polynomial below |x| = 1/4 (where (1 - e) / (1 + e) would
// cancel), (1 - e) / (1 + e) with e = e^(-2|x|) above it; NaN stays NaN.
template <typename W>
inline typename W::V tanh_lanes(typename W::V x) {
  using V = typename W::V;
  const V one = W::set1(1.f), ax = abs(x), x2 = mul(ax, ax);
  const V e = exp2_neg<W>(mul(ax, W::set1(-2.f * kLog2e)));
  const V large = div(sub(one, e), add(one, e));
  V poly = W::set1(-1382.f / 155925.f);  // tanh x = x - x^3/3 + 2x^5/15 - ...; next term < 1e-8
  poly = fmadd(poly, x2, W::set1(62.f / 2835.f));
  poly = fmadd(poly, x2, W::set1(-17.f / 315.f));
  poly = fmadd(poly, x2, W::set1(2.f / 15.f));
  poly = fmadd(poly, x2, W::set1(-1.f / 3.f));
  const V small = fmadd(mul(poly, x2), ax, ax);
  return copysign(select(lt(ax, W::set1(0.25f)), small, large), x);
}

#endif

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
#if CM3LEON_AVX2
      const __m256 sv = _mm256_set1_ps(scale);
      for (; i + 8 <= d; i += 8) _mm256_storeu_ps(out + i, _mm256_mul_ps(load8(in + i), sv));
#endif
      for (; i < d; ++i) out[i] = to_float(in[i]) * scale;
    }
    for (; i < dp; ++i) out[i] = 0.f;
  }
}

// The same rows as NR-column strips per block of `block` rows, dst[rows_pad / block][dp / NR][block][NR]:
// one strip of a block, a micro-kernel B operand (V in O += P V, Q and dO in dK/dV), is then contiguous
// memory that the hardware prefetcher streams (row-major V made P V ~5% slower when V comes from L3).
template <typename T>
void pack_strips(const T* src, int64_t stride, int64_t rows, int64_t d, int64_t rows_pad, int64_t block,
                 int64_t dp, float* dst) {
  for (int64_t r = 0; r < rows_pad; ++r) {
    float* out = dst + (r / block) * block * dp + (r % block) * NR;
    const T* in = src + r * stride;
    for (int64_t c = 0; c < dp; c += 8) {
      float* o = out + (c / NR) * block * NR + c % NR;
      const int64_t n = r < rows ? std::clamp<int64_t>(d - c, 0, 8) : 0;  // data columns of these eight
#if CM3LEON_AVX2
      if (n == 8) {
        _mm256_storeu_ps(o, load8(in + c));
        continue;
      }
#endif
      for (int64_t j = 0; j < 8; ++j) o[j] = j < n ? to_float(in[c + j]) : 0.f;
    }
  }
}

#if CM3LEON_AVX2
// dst[c * ld + r] = src[r * stride + c] * scale for an 8 x 8 block: three shuffle stages in registers.
template <typename T>
inline void transpose_8x8(const T* src, int64_t stride, float scale, float* dst, int64_t ld) {
  const __m256 sv = _mm256_set1_ps(scale);
  __m256 row[8], pair[8], quad[8];
  for (int r = 0; r < 8; ++r) row[r] = _mm256_mul_ps(load8(src + r * stride), sv);
  for (int r = 0; r < 8; r += 2) {  // interleave rows 2i, 2i+1 per 128-bit lane
    pair[r] = _mm256_unpacklo_ps(row[r], row[r + 1]);
    pair[r + 1] = _mm256_unpackhi_ps(row[r], row[r + 1]);
  }
  for (int r = 0; r < 8; r += 4)  // gather four rows' elements per column and lane
    for (int h = 0; h < 2; ++h) {
      quad[r + 2 * h] = _mm256_shuffle_ps(pair[r + h], pair[r + h + 2], _MM_SHUFFLE(1, 0, 1, 0));
      quad[r + 2 * h + 1] = _mm256_shuffle_ps(pair[r + h], pair[r + h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    }
  for (int c = 0; c < 4; ++c) {  // join rows 0-3 and 4-7: low lanes give columns 0-3, high lanes 4-7
    _mm256_storeu_ps(dst + c * ld, _mm256_permute2f128_ps(quad[c], quad[c + 4], 0x20));
    _mm256_storeu_ps(dst + (c + 4) * ld, _mm256_permute2f128_ps(quad[c], quad[c + 4], 0x31));
  }
}
#endif

// The same rows packed as panels of `pr` rows: dst[rows_pad / pr][dp][pr] (the micro-kernel's operand).
template <typename T>
void pack_panels(const T* src, int64_t stride, int64_t rows, int64_t d, float scale, int64_t pr,
                 int64_t rows_pad, int64_t dp, float* dst) {
  for (int64_t r0 = 0; r0 < rows_pad; r0 += pr) {
    float* panel = dst + r0 * dp;
    int64_t r = 0;
#if CM3LEON_AVX2
    if (pr % 8 == 0 && d % 8 == 0)
      for (; r + 8 <= pr && r0 + r + 8 <= rows; r += 8) {
        for (int64_t i = 0; i < d; i += 8)
          transpose_8x8(src + (r0 + r) * stride + i, stride, scale, panel + i * pr + r, pr);
        for (int64_t i = d; i < dp; ++i) _mm256_storeu_ps(panel + i * pr + r, _mm256_setzero_ps());
      }
#endif
    for (; r < pr; ++r) {
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

// The keys query i of a segment sees, [lo(i), hi(i)) (empty when hi <= lo), and its converse: the queries
// that see some key of [j0, j1) are [first_query(j0), end_query(j1)). Both bounds grow with i. The
// diagonal of query i is i + shift; causal tightens window_right to 0.
struct KeyWindow {
  int64_t shift, q_len, k_len, left, right;  // left/right < 0: that side unbounded
  KeyWindow(const Problem& p, const Segment& s)
      : shift(s.k_len - s.q_len), q_len(s.q_len), k_len(s.k_len), left(p.window_left),
        right(p.causal ? 0 : p.window_right) {}
  int64_t lo(int64_t i) const { return left < 0 ? 0 : std::clamp<int64_t>(i + shift - left, 0, k_len); }
  int64_t hi(int64_t i) const {
    return right < 0 ? k_len : std::clamp<int64_t>(i + shift + right + 1, 0, k_len);
  }
  int64_t first_query(int64_t j0) const {
    return right < 0 ? 0 : std::clamp<int64_t>(j0 - shift - right, 0, q_len);
  }
  int64_t end_query(int64_t j1) const {
    return left < 0 ? q_len : std::clamp<int64_t>(j1 - shift + left, 0, q_len);
  }
};

// Softcap and ALiBi on a transposed tile of scores st[r * ld + c] (keys r < keys, queries c < queries, a
// multiple of NR), in natural units. With cap > 0 the tile arrives as x = scale q.k / softcap and becomes
// cap * tanh(x) (tanh(x) is also stored in t[r * ld + c] when t is given: the backward's derivative 1 - t^2);
// with slope != 0 (ALiBi), slope * |diag[c] - r| is subtracted, diag[c] being query c's diagonal relative to
// the tile's first key.
inline void modify_scores(float* st, int64_t ld, int64_t keys, int64_t queries, float cap, float slope,
                          const float* diag, float* t) {
#if CM3LEON_AVX2
  using W = Wide;
  const W::V capv = W::set1(cap), neg_slope = W::set1(-slope);
  for (int64_t c = 0; c < queries; c += W::kLanes)
    for (int64_t r = 0; r < keys; ++r) {
      float* x = st + r * ld + c;
      W::V s = W::load(x);
      if (cap > 0.f) {
        const W::V th = tanh_lanes<W>(s);
        if (t) W::store(t + r * ld + c, th);
        s = mul(capv, th);
      }
      if (slope != 0.f) s = fmadd(neg_slope, abs(sub(W::load(diag + c), W::set1(float(r)))), s);
      W::store(x, s);
    }
#else
  for (int64_t r = 0; r < keys; ++r)
    for (int64_t c = 0; c < queries; ++c) {
      float& s = st[r * ld + c];
      if (cap > 0.f) {
        const float th = std::tanh(s);
        if (t) t[r * ld + c] = th;
        s = cap * th;
      }
      if (slope != 0.f) s -= slope * std::fabs(diag[c] - float(r));
    }
#endif
}

CM3LEON_ISA_END
}  // namespace cm3leon::attention
