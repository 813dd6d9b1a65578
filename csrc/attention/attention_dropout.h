// Attention dropout's keep mask (torch-free, header-only). One function, dropout_row, decides which elements
// are kept: the forward and backward kernels call it to drop probabilities and the mask op
// (flash_attn_dropout_mask) calls it to show the same mask to tests and to S_dmask.
//
// Element (segment b, query head h, query i, key j) is kept iff the uniform u = word * 2^-32 >= p, where word is
// lane j % 4 of Philox4x32-10 under key = the 64-bit seed at counter (j / 4, i, b * heads_q + h, kStreamTag):
// a pure function of (seed, b, h, i, j, p), so it does not depend on tiling, threads or call order, and the
// backward regenerates the forward's mask. i and j count from the segment's (batch row's or document's)
// first query and key.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/philox.h"
#include "common/simd.h"

namespace cm3leon::attention {

struct DropoutStream {
  uint64_t seed = 0;
  uint64_t threshold = 0;  // keep iff word >= threshold; 0 keeps everything (p == 0)
};

// ceil(p * 2^32) for p in [0, 1): word * 2^-32 >= p  <=>  word >= ceil(p * 2^32) (exact in double).
inline uint64_t dropout_threshold(double p) { return uint64_t(std::ceil(std::ldexp(p, 32))); }

CM3LEON_ISA_BEGIN

// Word 3 of every dropout counter: the sampling streams (philox.h) put a step's high half there, so they would
// need step >= 2^63 to meet a dropout counter.
constexpr uint32_t kStreamTag = 0xE4726F70u;  // "drop" in ASCII with the top bit set

#if CM3LEON_AVX2
// hi and lo words of m * a in each of eight 32-bit lanes (mul_epu32 multiplies the even lanes).
inline void mulhilo8(__m256i m, __m256i a, __m256i* hi, __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m), odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// philox4x32_10 of eight counters at once, bit for bit: lane n of c[w] is word w of counter n.
inline void philox4x32_10_x8(__m256i c[4], uint32_t key0, uint32_t key1) {
  using namespace philox_detail;
  const __m256i m0 = _mm256_set1_epi32(int(kMul0)), m1 = _mm256_set1_epi32(int(kMul1));
  for (int round = 0; round < 10; ++round) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(m0, c[0], &hi0, &lo0);
    mulhilo8(m1, c[2], &hi1, &lo1);
    c[0] = _mm256_xor_si256(_mm256_xor_si256(hi1, c[1]), _mm256_set1_epi32(int(key0)));
    c[2] = _mm256_xor_si256(_mm256_xor_si256(hi0, c[3]), _mm256_set1_epi32(int(key1)));
    c[1] = lo1;
    c[3] = lo0;
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
}
#endif

// Calls emit(j, kept) for keys j in [j0, j1) of query i of stream b * heads_q + h. With AVX2, eight counters
// (32 keys) at a time; the decisions are the scalar loop's.
template <typename Emit>
inline void dropout_row(const DropoutStream& ds, uint32_t stream, uint32_t i, int64_t j0, int64_t j1, Emit&& emit) {
  int64_t j4 = j0 & ~int64_t(3);
#if CM3LEON_AVX2
  if (ds.threshold <= 0xFFFFFFFFu) {  // else nothing is kept: the scalar loop says so
    const __m256i t = _mm256_set1_epi32(int(uint32_t(ds.threshold)));
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (; j4 + 32 <= j1; j4 += 32) {
      __m256i c[4] = {_mm256_add_epi32(_mm256_set1_epi32(int(uint32_t(j4 >> 2))), lanes), _mm256_set1_epi32(int(i)),
                      _mm256_set1_epi32(int(stream)), _mm256_set1_epi32(int(kStreamTag))};
      philox4x32_10_x8(c, uint32_t(ds.seed), uint32_t(ds.seed >> 32));
      int kept[4];  // bit n of kept[w]: key j4 + 4 n + w (word >= t, unsigned)
      for (int w = 0; w < 4; ++w)
        kept[w] = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_max_epu32(c[w], t), c[w])));
      for (int64_t n = 0; n < 8; ++n)
        for (int64_t w = 0; w < 4; ++w)
          if (j4 + 4 * n + w >= j0) emit(j4 + 4 * n + w, bool((kept[w] >> n) & 1));
    }
  }
#endif
  for (; j4 < j1; j4 += 4) {
    const Philox4x32 w = philox4x32_10(Philox4x32{{uint32_t(j4 >> 2), i, stream, kStreamTag}}, uint32_t(ds.seed),
                                       uint32_t(ds.seed >> 32));
    for (int64_t lane = 0; lane < 4; ++lane) {
      const int64_t j = j4 + lane;
      if (j >= j0 && j < j1) emit(j, uint64_t(w.v[lane]) >= ds.threshold);
    }
  }
}

CM3LEON_ISA_END
}  // namespace cm3leon::attention
