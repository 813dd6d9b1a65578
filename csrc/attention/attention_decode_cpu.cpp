// Split-KV attention for short queries (decode: one new token per row).
//
// Decode is memory-bound: every cached K/V row is read once per token. A work item is (segment, kv head,
// slice of the key range); it handles all query rows of the GQA group at once so each K/V row is loaded
// (and widened from bf16/fp16) once while it sits in L1. Scores of eight keys are computed together and
// reduced with one transpose-add, the softmax is online, and the slices' partial (max, sum, output) are
// merged by their log-sum-exp. Splitting the key range keeps both cores busy when batch x heads is small.
#include "attention/attention_decode.h"

#include <algorithm>
#include <vector>

#include "attention/attention_tiles.h"
#include "common/parallel.h"

namespace cm3leon::attention {

#if CM3LEON_ATTN_AVX2
namespace {

constexpr int64_t kMaxRows = 8;    // query rows per kv head that the decode path takes
constexpr int64_t kChunk = 64;     // keys per online-softmax step (their K/V rows stay in L1)
constexpr int64_t kMinSlice = 512; // keys per split slice at least (merging costs a pass over the output)

// Dot products of q (fp32, d floats) with eight key rows.
template <typename T>
inline __m256 dot8(const float* q, const T* const* krow, int64_t d) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t i = 0; i < d; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    a0 = _mm256_fmadd_ps(qv, load8(krow[0] + i), a0);
    a1 = _mm256_fmadd_ps(qv, load8(krow[1] + i), a1);
    a2 = _mm256_fmadd_ps(qv, load8(krow[2] + i), a2);
    a3 = _mm256_fmadd_ps(qv, load8(krow[3] + i), a3);
    a4 = _mm256_fmadd_ps(qv, load8(krow[4] + i), a4);
    a5 = _mm256_fmadd_ps(qv, load8(krow[5] + i), a5);
    a6 = _mm256_fmadd_ps(qv, load8(krow[6] + i), a6);
    a7 = _mm256_fmadd_ps(qv, load8(krow[7] + i), a7);
  }
  // Transpose-reduce: lane j of the result is the full sum of a_j.
  const __m256 t0 = _mm256_hadd_ps(a0, a1), t1 = _mm256_hadd_ps(a2, a3);
  const __m256 t2 = _mm256_hadd_ps(a4, a5), t3 = _mm256_hadd_ps(a6, a7);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// o[0:d] = o * alpha + sum_j p[j] * v_j for n value rows (row stride `stride`).
template <typename T>
inline void accumulate_pv(float* o, float alpha, const float* p, const T* v, int64_t stride, int64_t n,
                          int64_t d) {
  const __m256 av = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 32 <= d; i += 32) {  // four independent accumulators hide the FMA latency
    __m256 o0 = _mm256_mul_ps(_mm256_loadu_ps(o + i), av), o1 = _mm256_mul_ps(_mm256_loadu_ps(o + i + 8), av);
    __m256 o2 = _mm256_mul_ps(_mm256_loadu_ps(o + i + 16), av);
    __m256 o3 = _mm256_mul_ps(_mm256_loadu_ps(o + i + 24), av);
    for (int64_t j = 0; j < n; ++j) {
      const __m256 pj = _mm256_broadcast_ss(p + j);
      const T* vj = v + j * stride + i;
      o0 = _mm256_fmadd_ps(pj, load8(vj), o0);
      o1 = _mm256_fmadd_ps(pj, load8(vj + 8), o1);
      o2 = _mm256_fmadd_ps(pj, load8(vj + 16), o2);
      o3 = _mm256_fmadd_ps(pj, load8(vj + 24), o3);
    }
    _mm256_storeu_ps(o + i, o0); _mm256_storeu_ps(o + i + 8, o1);
    _mm256_storeu_ps(o + i + 16, o2); _mm256_storeu_ps(o + i + 24, o3);
  }
  for (; i < d; i += 8) {
    __m256 o0 = _mm256_mul_ps(_mm256_loadu_ps(o + i), av);
    for (int64_t j = 0; j < n; ++j) o0 = _mm256_fmadd_ps(_mm256_broadcast_ss(p + j), load8(v + j * stride + i), o0);
    _mm256_storeu_ps(o + i, o0);
  }
}

struct Partial {  // one slice's result for one query row
  float m, l;     // running max (log2 units) and sum of 2^(s - m)
};

template <typename T>
void decode(const Problem& pr, const T* q, const T* k, const T* v, T* out, float* lse) {
  const int64_t d = pr.head_dim, hq = pr.heads_q, hkv = pr.heads_kv, group = hq / hkv;
  int64_t max_k = 0, max_q = 0;
  for (int64_t s = 0; s < pr.num_segments; ++s) {
    max_k = std::max(max_k, pr.segments[s].k_len);
    max_q = std::max(max_q, pr.segments[s].q_len);
  }
  const int64_t rows_max = group * max_q;
  const int64_t heads = pr.num_segments * hkv;
  const int64_t want = 4 * int64_t(num_threads());
  const int64_t splits =
      std::max<int64_t>(1, std::min(ceil_div(want, std::max<int64_t>(heads, 1)), max_k / kMinSlice));
  std::vector<float> part_o(size_t(heads * splits * rows_max * d));
  std::vector<Partial> part_ml(size_t(heads * splits * rows_max));
  const float qscale = pr.scale * kLog2e;

  parallel_items(heads * splits, [&](int64_t item) {
    const int64_t hs = item / splits, split = item % splits;
    const Segment& sg = pr.segments[hs / hkv];
    const int64_t hk = hs % hkv, rows = group * sg.q_len;
    const int64_t slice = round_up(ceil_div(sg.k_len, splits), 8);
    const int64_t k0 = std::min(sg.k_len, split * slice), k1 = std::min(sg.k_len, k0 + slice);
    float* o = part_o.data() + item * rows_max * d;
    Partial* ml = part_ml.data() + item * rows_max;

    float qs[kMaxRows][256];
    int64_t limit[kMaxRows];
    int64_t k_end = k0;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t h = hk * group + r / sg.q_len, i = r % sg.q_len;
      const T* src = q + ((sg.q_start + i) * hq + h) * d;
      for (int64_t c = 0; c < d; ++c) qs[r][c] = to_float(src[c]) * qscale;
      limit[r] = std::min(k1, visible_keys(i, sg.q_len, sg.k_len, pr.causal));
      k_end = std::max(k_end, limit[r]);
      ml[r] = {kNegInf, 0.f};
      std::fill(o + r * d, o + (r + 1) * d, 0.f);
    }

    const int64_t stride = hkv * d;
    const T* kbase = k + (sg.k_start * hkv + hk) * d;
    const T* vbase = v + (sg.k_start * hkv + hk) * d;
    alignas(32) float s[kChunk];
    for (int64_t n0 = k0; n0 < k_end; n0 += kChunk) {
      const int64_t cnt = std::min(kChunk, k_end - n0), cnt8 = round_up(cnt, 8);
      const T* krow[kChunk];
      for (int64_t j = 0; j < cnt8; ++j) krow[j] = kbase + std::min(n0 + j, n0 + cnt - 1) * stride;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t j = 0; j < cnt8; j += 8) _mm256_store_ps(s + j, dot8(qs[r], krow + j, d));
        const int64_t valid = std::clamp<int64_t>(limit[r] - n0, 0, cnt);
        if (valid == 0) continue;
        std::fill(s + valid, s + cnt8, kNegInf);
        const float m_new = std::max(ml[r].m, row_max(s, cnt8));
        const float alpha = exp2f(ml[r].m - m_new);
        ml[r].l = ml[r].l * alpha + exp2_shifted_sum(s, cnt8, m_new);
        ml[r].m = m_new;
        accumulate_pv(o + r * d, alpha, s, vbase + n0 * stride, stride, valid, d);
      }
    }
  });

  // Merge the slices of every (segment, kv head, row) by their log-sum-exp.
  parallel_items(heads, [&](int64_t hs) {
    const Segment& sg = pr.segments[hs / hkv];
    const int64_t hk = hs % hkv;
    for (int64_t r = 0; r < group * sg.q_len; ++r) {
      const int64_t h = hk * group + r / sg.q_len, i = r % sg.q_len;
      float m = kNegInf;
      for (int64_t sp = 0; sp < splits; ++sp) m = std::max(m, part_ml[size_t((hs * splits + sp) * rows_max + r)].m);
      float acc[256] = {};
      float l = 0.f;
      if (m != kNegInf) {
        for (int64_t sp = 0; sp < splits; ++sp) {
          const Partial& pm = part_ml[size_t((hs * splits + sp) * rows_max + r)];
          if (pm.m == kNegInf) continue;
          const float w = exp2f(pm.m - m);
          l += pm.l * w;
          const float* po = part_o.data() + ((hs * splits + sp) * rows_max + r) * d;
          for (int64_t c = 0; c < d; ++c) acc[c] += po[c] * w;
        }
      }
      const float inv = l > 0.f ? 1.f / l : 0.f;
      T* dst = out + ((sg.q_start + i) * hq + h) * d;
      for (int64_t c = 0; c < d; ++c) from_float(acc[c] * inv, dst + c);
      lse[sg.lse_start + h * pr.lse_head_stride + i] = l > 0.f ? (m + std::log2(l)) * kLn2 : kNegInf;
    }
  });
}

}  // namespace

bool decode_applies(const Problem& p) {
  int64_t max_q = 0;
  for (int64_t s = 0; s < p.num_segments; ++s) max_q = std::max(max_q, p.segments[s].q_len);
  return max_q * (p.heads_q / p.heads_kv) <= kMaxRows && p.head_dim % 8 == 0 && p.head_dim <= 256;
}

void decode_forward(const Problem& p, const void* q, const void* k, const void* v, void* out, float* lse) {
  dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    decode(p, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<T*>(out),
           lse);
  });
}
#else
bool decode_applies(const Problem&) { return false; }
void decode_forward(const Problem&, const void*, const void*, const void*, void*, float*) {}
#endif

}  // namespace cm3leon::attention
