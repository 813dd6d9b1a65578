// Split-KV attention for short queries (decode: one new token per row).
//
// Decode is memory-bound: every cached K/V row is read once per token, so the loop order follows memory
// (tokens outer, heads inner) and each K/V element is widened from bf16/fp16 once. Eight dot products are
// computed together and reduced with one transpose-add; the softmax is online; the key range of each row is
// split into slices when there are fewer rows than cores can use, and the slices' partial (max, sum,
// output) are merged by their log-sum-exp. Keys are read in place, from a contiguous or a paged cache
// (DecodeLayout), at any head dim: rows are never padded or copied.
#include "attention/attention_decode.h"

#include <algorithm>
#include <vector>

#include "attention/attention_tiles.h"
#include "common/parallel.h"

namespace cm3leon::attention {
CM3LEON_ISA_BEGIN

#if CM3LEON_AVX2
namespace {

constexpr int64_t kMaxRows = 8;     // query rows per kv head that the decode path takes
constexpr int64_t kChunk = 32;      // keys per online-softmax step
constexpr int64_t kMinSlice = 512;  // keys per split slice at least (merging costs a pass over the output)

// Eight dot products q_i . k_i of d elements (fp32 queries, keys widened on load), the widest vectors of the
// level along d. The last d % 8 elements are summed one by one: a cached row is the caller's memory and may
// end right after element d - 1.
template <typename T>
inline __m256 dot8(const float* const* q, const T* const* k, int64_t d) {
  using W = Wide;
  W::V a0 = W::zero(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  int64_t i = 0;
  for (; i + W::kLanes <= d; i += W::kLanes) {
    a0 = fmadd(W::load(q[0] + i), W::load(k[0] + i), a0);
    a1 = fmadd(W::load(q[1] + i), W::load(k[1] + i), a1);
    a2 = fmadd(W::load(q[2] + i), W::load(k[2] + i), a2);
    a3 = fmadd(W::load(q[3] + i), W::load(k[3] + i), a3);
    a4 = fmadd(W::load(q[4] + i), W::load(k[4] + i), a4);
    a5 = fmadd(W::load(q[5] + i), W::load(k[5] + i), a5);
    a6 = fmadd(W::load(q[6] + i), W::load(k[6] + i), a6);
    a7 = fmadd(W::load(q[7] + i), W::load(k[7] + i), a7);
  }
  __m256 b0 = fold8(a0), b1 = fold8(a1), b2 = fold8(a2), b3 = fold8(a3);
  __m256 b4 = fold8(a4), b5 = fold8(a5), b6 = fold8(a6), b7 = fold8(a7);
  if (i + 8 <= d) {  // 16-lane levels: one 8-element step before the scalar tail
    b0 = _mm256_fmadd_ps(_mm256_loadu_ps(q[0] + i), load8(k[0] + i), b0);
    b1 = _mm256_fmadd_ps(_mm256_loadu_ps(q[1] + i), load8(k[1] + i), b1);
    b2 = _mm256_fmadd_ps(_mm256_loadu_ps(q[2] + i), load8(k[2] + i), b2);
    b3 = _mm256_fmadd_ps(_mm256_loadu_ps(q[3] + i), load8(k[3] + i), b3);
    b4 = _mm256_fmadd_ps(_mm256_loadu_ps(q[4] + i), load8(k[4] + i), b4);
    b5 = _mm256_fmadd_ps(_mm256_loadu_ps(q[5] + i), load8(k[5] + i), b5);
    b6 = _mm256_fmadd_ps(_mm256_loadu_ps(q[6] + i), load8(k[6] + i), b6);
    b7 = _mm256_fmadd_ps(_mm256_loadu_ps(q[7] + i), load8(k[7] + i), b7);
    i += 8;
  }
  // Transpose-reduce: lane j of the result is the full sum of b_j.
  const __m256 t0 = _mm256_hadd_ps(b0, b1), t1 = _mm256_hadd_ps(b2, b3);
  const __m256 t2 = _mm256_hadd_ps(b4, b5), t3 = _mm256_hadd_ps(b6, b7);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  if (i == d) return sum;
  alignas(32) float tail[8];
  for (int u = 0; u < 8; ++u) {
    float t = 0.f;
    for (int64_t j = i; j < d; ++j) t += q[u][j] * to_float(k[u][j]);
    tail[u] = t;
  }
  return _mm256_add_ps(sum, _mm256_load_ps(tail));
}

// o[0:d] += p * v[0:d] (the widest vectors, then eight lanes, then the tail as in dot8)
template <typename T>
inline void axpy(float* o, float p, const T* v, int64_t d) {
  const Wide::V pw = Wide::set1(p);
  int64_t i = 0;
  for (; i + Wide::kLanes <= d; i += Wide::kLanes) Wide::store(o + i, fmadd(pw, Wide::load(v + i), Wide::load(o + i)));
  const __m256 pv = _mm256_set1_ps(p);
  for (; i + 8 <= d; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(pv, load8(v + i), _mm256_loadu_ps(o + i)));
  for (; i < d; ++i) o[i] += p * to_float(v[i]);
}

// A work item is (segment, slice of its keys) and covers every query row of the segment ("pairs" of query
// head and position; pair = h * q_len + i). Cached rows are [token][heads_kv][d], so walking keys in token
// order with all heads inside reads K and V sequentially (per-head walks would stride by heads_kv * d bytes
// and defeat the prefetchers). Per chunk of keys: scores of all pairs, the softcap / ALiBi / mask and the
// online softmax vectorised over eight pairs at a time, then O += P V.
template <typename T>
void decode(const Problem& pr, const DecodeLayout& lay, const T* q, const T* k, const T* v, T* out, float* lse) {
  const int64_t d = pr.head_dim, dq = round_up(d, 8), hq = pr.heads_q, hkv = pr.heads_kv, group = hq / hkv;
  int64_t max_k = 0, max_q = 0;
  for (int64_t s = 0; s < pr.num_segments; ++s) {
    max_k = std::max(max_k, pr.segments[s].k_len);
    max_q = std::max(max_q, pr.segments[s].q_len);
  }
  const int64_t pairs_max = round_up(hq * max_q, 8);
  const int64_t want = 8 * int64_t(usable_threads(pr.threads));  // enough items for dynamic balance on busy cores
  // Slices are whole multiples of 8 keys, so more than ceil(max_k / 8) of them would be empty.
  const int64_t splits =
      lay.num_splits > 0
          ? std::clamp<int64_t>(ceil_div(max_k, 8), 1, lay.num_splits)
          : std::max<int64_t>(
                1, std::min(ceil_div(want, std::max<int64_t>(pr.num_segments, 1)), max_k / kMinSlice));
  const int64_t items = pr.num_segments * splits;
  std::vector<float> part_o(size_t(items * pairs_max * dq)), part_m(size_t(items * pairs_max)),
      part_l(size_t(items * pairs_max));
  const bool capped = pr.softcap > 0.f;
  // Scores in log2 units: the scale (and log2 e) is folded into q, or applied after the cap.
  const float qscale = capped ? pr.scale / pr.softcap : pr.scale * kLog2e;
  const __m256 cap = Ymm::set1(pr.softcap * kLog2e);
  const int64_t stride = hkv * d;  // elements between consecutive cached tokens

  parallel_items(pr.threads, items, [&](int64_t item) {
    const int64_t seg = item / splits, split = item % splits;
    const Segment& sg = pr.segments[seg];
    const int64_t pairs = hq * sg.q_len, pairs8 = round_up(pairs, 8);
    const int64_t slice = round_up(ceil_div(sg.k_len, splits), 8);
    const int64_t k0 = std::min(sg.k_len, split * slice), k1 = std::min(sg.k_len, k0 + slice);
    float* o = part_o.data() + item * pairs_max * dq;
    float* m = part_m.data() + item * pairs_max;
    float* l = part_l.data() + item * pairs_max;
    const float* slopes = pr.alibi_slopes ? pr.alibi_slopes + seg * pr.alibi_segment_stride : nullptr;

    // Per pair: q (scaled, zero-padded to dq), kv head offset, visible range, ALiBi slope and diagonal.
    thread_local std::vector<float> qs, sc, lower, upper, slope, diag;
    thread_local std::vector<int64_t> koff;
    qs.resize(size_t(pairs8 * dq)); sc.resize(size_t(kChunk * pairs8));
    koff.resize(size_t(pairs8)); lower.resize(size_t(pairs8)); upper.resize(size_t(pairs8));
    slope.resize(size_t(pairs8)); diag.resize(size_t(pairs8));
    const KeyWindow window(pr, sg);
    int64_t k_begin = k1, k_end = k0;
    for (int64_t pi = 0; pi < pairs8; ++pi) {
      const int64_t pc = std::min(pi, pairs - 1);  // padding lanes repeat the last pair
      const int64_t h = pc / sg.q_len, i = pc % sg.q_len, dg = i + sg.k_len - sg.q_len;
      const T* src = q + ((sg.q_start + i) * hq + h) * d;
      float* dst = qs.data() + pi * dq;
      for (int64_t c = 0; c < d; ++c) dst[c] = to_float(src[c]) * qscale;
      std::fill(dst + d, dst + dq, 0.f);
      koff[size_t(pi)] = (h / group) * d;
      const int64_t lo = std::max(k0, window.lo(i)), hi = std::min(k1, window.hi(i));
      lower[size_t(pi)] = float(lo);
      upper[size_t(pi)] = float(hi);
      if (lo < hi) {
        k_begin = std::min(k_begin, lo);
        k_end = std::max(k_end, hi);
      }
      slope[size_t(pi)] = slopes ? slopes[h] * kLog2e : 0.f;
      diag[size_t(pi)] = float(dg);
      m[pi] = kNegInf;
      l[pi] = 0.f;
    }
    std::fill(o, o + pairs8 * dq, 0.f);
    if (pairs == 0) return;

    const int32_t* table = lay.block_table ? lay.block_table + seg * lay.table_stride : nullptr;
    int64_t off[kChunk];  // element offset of each key's row in k and v
    for (int64_t n0 = k_begin; n0 < k_end; n0 += kChunk) {
      const int64_t cnt = std::min(kChunk, k_end - n0);
      if (table) {  // walk the pages: one division per chunk, not per key
        int64_t blk = (sg.k_start + n0) / lay.page, slot = (sg.k_start + n0) % lay.page;
        for (int64_t j = 0; j < cnt; ++j) {
          off[j] = (int64_t(table[blk]) * lay.page + slot) * stride;
          if (++slot == lay.page) slot = 0, ++blk;
        }
      } else {
        for (int64_t j = 0; j < cnt; ++j) off[j] = (sg.k_start + n0 + j) * stride;
      }
      // Scores, key-major: sc[j][pair].
      for (int64_t j = 0; j < cnt; ++j) {
        const T* krow = k + off[j];
        for (int64_t p0 = 0; p0 < pairs8; p0 += 8) {
          const float* qp[8];
          const T* kp[8];
          for (int64_t u = 0; u < 8; ++u) {
            qp[u] = qs.data() + (p0 + u) * dq;
            kp[u] = krow + koff[size_t(p0 + u)];
          }
          _mm256_storeu_ps(sc.data() + j * pairs8 + p0, dot8(qp, kp, d));
        }
      }
      // Cap, bias, mask and the online softmax over this chunk for eight pairs at a time; P overwrites the
      // scores.
      for (int64_t p0 = 0; p0 < pairs8; p0 += 8) {
        const __m256 lo = _mm256_loadu_ps(lower.data() + p0), hi = _mm256_loadu_ps(upper.data() + p0);
        const __m256 sl = _mm256_loadu_ps(slope.data() + p0), dg = _mm256_loadu_ps(diag.data() + p0);
        __m256 mx = _mm256_set1_ps(kNegInf);
        for (int64_t j = 0; j < cnt; ++j) {
          float* sj = sc.data() + j * pairs8 + p0;
          const __m256 n = _mm256_set1_ps(float(n0 + j));
          __m256 x = _mm256_loadu_ps(sj);
          if (capped) x = mul(cap, tanh_lanes<Ymm>(x));
          if (slopes) {  // -slope * |diag - n|
            const __m256 dist = _mm256_andnot_ps(_mm256_set1_ps(-0.f), _mm256_sub_ps(dg, n));
            x = _mm256_fnmadd_ps(sl, dist, x);
          }
          const __m256 keep = _mm256_and_ps(_mm256_cmp_ps(n, lo, _CMP_GE_OQ), _mm256_cmp_ps(n, hi, _CMP_LT_OQ));
          x = _mm256_blendv_ps(_mm256_set1_ps(kNegInf), x, keep);
          _mm256_storeu_ps(sj, x);
          mx = _mm256_max_ps(mx, x);
        }
        const __m256 m_old = _mm256_loadu_ps(m + p0);
        __m256 m_new = _mm256_max_ps(m_old, mx);
        // Rows with nothing visible yet keep max -inf; subtract 0 instead so 2^(-inf - 0) = 0, not NaN.
        const __m256 none = _mm256_cmp_ps(m_new, _mm256_set1_ps(kNegInf), _CMP_EQ_OQ);
        m_new = _mm256_blendv_ps(m_new, _mm256_setzero_ps(), none);
        const __m256 alpha = exp2_neg<Ymm>(_mm256_sub_ps(m_old, m_new));
        __m256 sum = _mm256_setzero_ps();
        for (int64_t j = 0; j < cnt; ++j) {
          float* sj = sc.data() + j * pairs8 + p0;
          const __m256 pj = exp2_neg<Ymm>(_mm256_sub_ps(_mm256_loadu_ps(sj), m_new));
          _mm256_storeu_ps(sj, pj);
          sum = _mm256_add_ps(sum, pj);
        }
        _mm256_storeu_ps(l + p0, _mm256_fmadd_ps(_mm256_loadu_ps(l + p0), alpha, sum));
        _mm256_storeu_ps(m + p0, m_new);
        alignas(32) float a[8];
        _mm256_store_ps(a, alpha);
        for (int64_t u = 0; u < 8; ++u)
          if (a[u] != 1.f) scale_row(o + (p0 + u) * dq, d, a[u]);
      }
      // O += P V, reading V rows in token order.
      for (int64_t j = 0; j < cnt; ++j) {
        const T* vrow = v + off[j];
        const float* pj = sc.data() + j * pairs8;
        for (int64_t pi = 0; pi < pairs; ++pi)
          if (pj[pi] != 0.f) axpy(o + pi * dq, pj[pi], vrow + koff[size_t(pi)], d);
      }
    }
  });

  // Merge the slices of every (segment, pair) by their log-sum-exp. (A slice whose rows saw nothing has
  // m = 0 and l = 0, so it adds nothing; a NaN l, from NaN or inf inputs, makes the row NaN as in PyTorch.)
  parallel_items(pr.threads, pr.num_segments, [&](int64_t seg) {
    const Segment& sg = pr.segments[seg];
    for (int64_t pi = 0; pi < hq * sg.q_len; ++pi) {
      const int64_t h = pi / sg.q_len, i = pi % sg.q_len;
      float mm = kNegInf;
      for (int64_t sp = 0; sp < splits; ++sp) {
        const size_t at = size_t((seg * splits + sp) * pairs_max + pi);
        if (part_l[at] != 0.f && !(part_m[at] <= mm)) mm = part_m[at];  // a NaN max wins
      }
      float acc[256] = {};
      float ll = 0.f;
      for (int64_t sp = 0; sp < splits && mm != kNegInf; ++sp) {
        const size_t at = size_t((seg * splits + sp) * pairs_max + pi);
        if (part_l[at] == 0.f) continue;
        const float w = exp2f(part_m[at] - mm);
        ll += part_l[at] * w;
        const float* po = part_o.data() + at * size_t(dq);
        for (int64_t c = 0; c < d; ++c) acc[c] += po[c] * w;
      }
      const float inv = ll == 0.f ? 0.f : 1.f / ll;
      T* dst = out + ((sg.q_start + i) * hq + h) * d;
      for (int64_t c = 0; c < d; ++c) from_float(acc[c] * inv, dst + c);
      lse[sg.lse_start + h * pr.lse_head_stride + i] = ll == 0.f ? kNegInf : (mm + std::log2(ll)) * kLn2;
    }
  });
}

}  // namespace

bool decode_applies(const Problem& p) {
  int64_t max_q = 0;
  for (int64_t s = 0; s < p.num_segments; ++s) max_q = std::max(max_q, p.segments[s].q_len);
  return max_q * (p.heads_q / p.heads_kv) <= kMaxRows && p.head_dim >= 1 && p.head_dim <= 256;
}

void decode_forward(const Problem& p, const void* q, const void* k, const void* v, void* out, float* lse,
                    const DecodeLayout& layout) {
  dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    decode(p, layout, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
           static_cast<T*>(out), lse);
  });
}
#else
bool decode_applies(const Problem&) { return false; }
void decode_forward(const Problem&, const void*, const void*, const void*, void*, float*, const DecodeLayout&) {}
#endif

CM3LEON_ISA_END

template <>
bool decode_kernel<kIsa>(const Problem& p, const DecodeLayout& layout, const void* q, const void* k,
                         const void* v, void* out, float* lse) {
  if (!decode_applies(p)) return false;
  decode_forward(p, q, k, v, out, lse, layout);
  return true;
}

}  // namespace cm3leon::attention
