// Fused sampling: each row runs a short pipeline over a row-sized fp32 workspace (L2-resident); no sort.
//
//   1. dense pass (vectorised): read the S streams once, mix, restrict, scale by 1/temperature -> z, and
//      keep the max of every 64-token chunk, the row max, the allowed count and a NaN/+inf flag;
//   2. top-k: the k-th largest chunk max is a lower bound of the k-th largest z (those k maxima are k
//      distinct tokens), so only tokens above it, in the few chunks that reach it, are collected; radix
//      selection (histograms of the order-preserving float key, 11/11/10 bits) finds the exact k-th value;
//   3. top-p: the same selection measuring probability mass; without top-k, tokens below
//      max + log((1 - p) Z / (2 count)) cannot reach the nucleus boundary and are never collected;
//   4. min-p is a plain threshold, max + log(min_p), because p(x) / p_max = exp(z - max);
//   5. draw by inverse CDF on the dense row: per-chunk weight sums (chunks whose max is below the final
//      threshold are skipped), one Philox uniform per (seed, row, step), then one chunk re-scanned token by
//      token. The order is fixed (token order, fixed chunks), so the result is run- and thread-invariant.
// Every filter is a threshold on z, so ties at a boundary are all kept and nothing depends on ordering.
#include "sampling/sampling_cpu.h"

#include <algorithm>
#include <functional>
#include <cmath>
#include <limits>
#include <new>
#include <vector>

#include "common/parallel.h"
#include "common/philox.h"
#include "sampling/sampling_math.h"
#include "sampling/sampling_simd.h"

namespace cm3leon::sampling {
CM3LEON_ISA_BEGIN
namespace {

using simd::exp_nonpositive;

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr int64_t kChunk = 64;  // tokens per chunk (8 AVX2 vectors)
// Below this size, clearing and scanning the radix histograms costs more than selecting directly.
constexpr int64_t kSmallSelect = 1024;

struct Workspace {
  std::vector<float> z;          // dense row (cfg: mixed logits / T; contrastive: expert, then final scores)
  std::vector<float> score;      // contrastive: expert - amateur / T_ama
  std::vector<float> chunk_max;  // per 64-token chunk of z
  std::vector<double> chunk_sum;
  std::vector<float> value, weight;          // collected candidates (values only; order irrelevant)
  std::vector<float> sel_value, sel_weight;  // radix selection's narrowed working set
  std::vector<int32_t> order;                // small selection's sort permutation
  std::vector<double> bin_measure;

  void reserve(int64_t vocab, bool contrastive) {
    const size_t v = size_t(vocab), chunks = size_t(ceil_div(vocab, kChunk));
    if (z.size() < v) {
      z.resize(v);
      value.resize(v);
      weight.resize(v);
      sel_value.resize(v);
      sel_weight.resize(v);
      order.resize(std::min<size_t>(v, kSmallSelect));
      chunk_max.resize(chunks);
      chunk_sum.resize(chunks);
    }
    if (contrastive && score.size() < v) score.resize(v);
    bin_measure.resize(2048);
  }
};

// select_threshold for small n: nth_element for counts; for mass, a sort of the few candidates.
float select_threshold_small(const float* v, const float* w, int64_t n, double target, Workspace& ws) {
  if (w == nullptr) {
    float* vals = ws.sel_value.data();
    if (v != vals) std::copy(v, v + n, vals);
    const int64_t k = std::min<int64_t>(std::max<int64_t>(int64_t(target), 1), n);
    std::nth_element(vals, vals + (k - 1), vals + n, std::greater<float>());
    return vals[k - 1];
  }
  // Sort candidate positions by value, descending; walk until the mass reaches the target.
  int32_t* order = ws.order.data();
  for (int64_t i = 0; i < n; ++i) order[i] = int32_t(i);
  std::sort(order, order + n, [&](int32_t a, int32_t b) { return v[a] > v[b]; });
  double acc = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    acc += double(w[order[i]]);
    if (acc >= target) return v[order[i]];
  }
  return v[order[n - 1]];  // rounding kept the target out of reach: keep everything
}

// The largest value t among v[0, n) such that measure({x : v[x] >= t}) >= target, where the measure is the
// element count (w == null) or the sum of w. Three histogram levels over the order-preserving key; each
// later level sees only the elements of the bin chosen before.
float select_threshold(const float* v, const float* w, int64_t n, double target, Workspace& ws) {
  if (n <= kSmallSelect) return select_threshold_small(v, w, n, target, ws);
  static constexpr int kShift[3] = {21, 10, 0};
  static constexpr int kBits[3] = {11, 11, 10};
  double* measure = ws.bin_measure.data();
  uint32_t prefix = 0;  // key bits decided so far
  double above = 0.0;   // measure of the elements whose key is above the current bin range
  const float* cur_v = v;
  const float* cur_w = w;
  int64_t cur_n = n;
  for (int level = 0; level < 3; ++level) {
    const int shift = kShift[level];
    const uint32_t bins = 1u << kBits[level];
    std::fill(measure, measure + bins, 0.0);
    for (int64_t i = 0; i < cur_n; ++i) {
      const uint32_t bin = (float_key(cur_v[i]) >> shift) & (bins - 1);
      measure[bin] += cur_w ? double(cur_w[i]) : 1.0;
    }
    int64_t chosen = 0;
    bool reached = false;
    for (int64_t b = int64_t(bins) - 1; b >= 0; --b) {
      if (measure[b] == 0.0) continue;
      chosen = b;
      if (above + measure[b] >= target) { reached = true; break; }
      above += measure[b];
    }
    if (!reached) {  // rounding kept the target out of reach: keep everything, down to the lowest bin
      above -= measure[chosen];
      target = above + measure[chosen];
    }
    prefix = (prefix << kBits[level]) | uint32_t(chosen);
    if (level == 2) break;
    float* out_v = ws.sel_value.data();  // in place after the first level: output never overtakes input
    float* out_w = ws.sel_weight.data();
    int64_t m = 0;
    for (int64_t i = 0; i < cur_n; ++i) {
      if ((float_key(cur_v[i]) >> shift) == prefix) {
        out_v[m] = cur_v[i];
        if (cur_w) out_w[m] = cur_w[i];
        ++m;
      }
    }
    cur_v = out_v;
    cur_w = cur_w ? out_w : nullptr;
    cur_n = m;
    // The rest of the answer lies in this bin: select it directly once it is small.
    if (cur_n <= kSmallSelect) return select_threshold_small(cur_v, cur_w, cur_n, target - above, ws);
  }
  return key_float(prefix);
}

// Collects the finite z >= bound of the chunks whose max reaches it into ws.value; returns the count.
int64_t collect(Workspace& ws, int64_t n, float bound) {
  const float* z = ws.z.data();
  float* out = ws.value.data();
  int64_t m = 0;
  for (int64_t c = 0; c < ceil_div(n, kChunk); ++c) {
    if (!(ws.chunk_max[c] >= bound)) continue;
    const int64_t end = std::min(n, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; ++i) {
      out[m] = z[i];
      m += (z[i] >= bound) & (z[i] > -kInf);
    }
  }
  return m;
}

// Keeps the collected values >= t (in place); returns the new count.
int64_t keep_at_least(float* v, int64_t n, float t) {
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    v[m] = v[i];
    m += v[i] >= t;
  }
  return m;
}

// w[i] = exp(v[i] - max); returns the sum.
double weigh(const float* v, int64_t n, float max, float* w) {
  int64_t i = 0;
  double total = 0.0;
#if CM3LEON_AVX2
  const __m256 m = _mm256_set1_ps(max);
  for (; i + 8 <= n; i += 8) {
    const __m256 e = simd::exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(v + i), m));
    _mm256_storeu_ps(w + i, e);
    total += simd::hsum(e);
  }
#endif
  for (; i < n; ++i) {
    w[i] = exp_nonpositive(v[i] - max);
    total += w[i];
  }
  return total;
}

// Weight of token i of the dense row under threshold t: exp(z - max) if z >= t, else 0.
inline float weight_at(float z, float t, float max) { return z >= t ? exp_nonpositive(z - max) : 0.f; }

// Sum of the weights of chunk [begin, end) (fixed lane order; see weight_at).
float chunk_weight(const float* z, int64_t begin, int64_t end, float t, float max) {
  int64_t i = begin;
  float sum = 0.f;
#if CM3LEON_AVX2
  if (end - begin == kChunk) {
    const __m256 tv = _mm256_set1_ps(t), m = _mm256_set1_ps(max);
    __m256 acc = _mm256_setzero_ps();
    for (; i < end; i += 8) {
      const __m256 x = _mm256_loadu_ps(z + i);
      const __m256 e = simd::exp_nonpositive(_mm256_sub_ps(x, m));
      acc = _mm256_add_ps(acc, _mm256_and_ps(e, _mm256_cmp_ps(x, tv, _CMP_GE_OQ)));
    }
    return simd::hsum(acc);
  }
#endif
  for (; i < end; ++i) sum += weight_at(z[i], t, max);
  return sum;
}

// Sums the weights of every chunk of the dense row into ws.chunk_sum; returns the total.
double dense_weights(Workspace& ws, const float* z, int64_t n, float t, float max) {
  double total = 0.0;
  for (int64_t c = 0; c < ceil_div(n, kChunk); ++c) {
    // Skipped chunks have weight exactly 0: nothing reaches t, or every exp_nonpositive(z - max) underflows.
    const bool live = ws.chunk_max[c] >= t && ws.chunk_max[c] - max > -87.f;
    const float s = live ? chunk_weight(z, c * kChunk, std::min(n, (c + 1) * kChunk), t, max) : 0.f;
    ws.chunk_sum[c] = s;
    total += s;
  }
  return total;
}

struct Draw {
  int64_t token;  // offset in the dense row
  float logprob;
};

// Inverse-CDF draw over the dense row z[0, n) with weights weight_at(z, t, max) and uniform u in [0, 1).
Draw draw_dense(Workspace& ws, const float* z, int64_t n, float t, float max, double u) {
  const double total = dense_weights(ws, z, n, t, max);
  const double target = u * total;
  double cum = 0.0;
  int64_t chunk = -1;
  for (int64_t c = 0; c < ceil_div(n, kChunk); ++c) {
    if (ws.chunk_sum[c] == 0.0) continue;
    chunk = c;
    if (cum + ws.chunk_sum[c] > target) break;
    cum += ws.chunk_sum[c];
  }
  // chunk >= 0: the max has weight 1 and survives every filter. Re-scan it token by token; the within-chunk
  // order of additions differs from the vector sum, so fall back to its last positive weight if needed.
  int64_t pick = -1;
  for (int64_t i = chunk * kChunk; i < std::min(n, (chunk + 1) * kChunk); ++i) {
    const float w = weight_at(z[i], t, max);
    if (w == 0.f) continue;
    pick = i;
    cum += w;
    if (cum > target) break;
  }
  return {pick, float(double(z[pick]) - double(max) - std::log(total))};
}

inline double row_uniform(const SeedSpec& seeds, int64_t row) {
  if (seeds.per_row) return philox_uniform(uint64_t(seeds.per_row[row]), 0u, seeds.step);
  return philox_uniform(uint64_t(seeds.shared), uint32_t(row), seeds.step);
}

// Offset of the first maximal element of the dense row (uses the chunk maxima).
int64_t first_argmax(const Workspace& ws, const float* z, int64_t n, float max) {
  for (int64_t c = 0; c < ceil_div(n, kChunk); ++c) {
    if (ws.chunk_max[c] != max) continue;
    for (int64_t i = c * kChunk;; ++i)
      if (z[i] == max) return i;
  }
  return 0;
}

struct ChunkStats {
  float max;
  int64_t count;
  bool bad;
};

#if CM3LEON_AVX2
// ChunkStats accumulated eight tokens at a time by the vector dense passes.
struct VecChunkStats {
  __m256 vmax = _mm256_set1_ps(-kInf), vbad = _mm256_setzero_ps();
  int64_t count = 0;

  void add(__m256 zv, __m256 bad, __m256 excluded) {
    vmax = _mm256_max_ps(vmax, zv);
    vbad = _mm256_or_ps(vbad, bad);
    count += 8 - __builtin_popcount(unsigned(_mm256_movemask_ps(excluded)));
  }
  ChunkStats result() const { return {simd::hmax(vmax), count, _mm256_movemask_ps(vbad) != 0}; }
};
#endif

// ---- dense passes --------------------------------------------------------------------------------------

struct MixParams {
  float s0, s1, inv_t;
};

// One token of the stream mix: fma(s_txt, full - img, fma(s_img, img - u, u)) for S = 3, fma(s, c - u, u) for
// S = 2, times 1/temperature; -inf in any stream (or a masked token) gives -inf; sets `bad` for NaN/+inf
// inputs or a result that overflows (a huge guidance scale, or a tiny temperature).
template <int S, typename T>
inline float mix_one(const T* const* src, int64_t i, bool allowed, const MixParams& p, bool& bad) {
  const float u = to_float(src[0][i]);
  bool b = !(u < kInf), excluded = u == -kInf;
  float m = u;
  if constexpr (S >= 2) {
    const float c = to_float(src[1][i]);
    b |= !(c < kInf);
    excluded |= c == -kInf;
    m = std::fma(p.s0, c - u, u);
    if constexpr (S == 3) {
      const float f = to_float(src[2][i]);
      b |= !(f < kInf);
      excluded |= f == -kInf;
      m = std::fma(p.s1, f - c, m);
    }
  }
  const float scaled = m * p.inv_t;
  b |= !excluded & !(std::fabs(scaled) < kInf);
  bad |= b;
  return (excluded | !allowed) ? -kInf : scaled;
}

template <int S, typename T>
ChunkStats cfg_chunk(const T* const* src, const bool* mask, int64_t begin, int64_t end, const MixParams& p,
                     float* z) {
#if CM3LEON_AVX2
  if (end - begin == kChunk) {
    const __m256 ninf = _mm256_set1_ps(-kInf), inf = _mm256_set1_ps(kInf);
    const __m256 s0 = _mm256_set1_ps(p.s0), s1 = _mm256_set1_ps(p.s1), inv_t = _mm256_set1_ps(p.inv_t);
    VecChunkStats st;
    for (int64_t i = begin; i < end; i += 8) {
      const __m256 u = simd::load8(src[0] + i);
      __m256 bad = simd::nan_or_pos_inf(u), excluded = _mm256_cmp_ps(u, ninf, _CMP_EQ_OQ), m = u;
      if constexpr (S >= 2) {
        const __m256 c = simd::load8(src[1] + i);
        bad = _mm256_or_ps(bad, simd::nan_or_pos_inf(c));
        excluded = _mm256_or_ps(excluded, _mm256_cmp_ps(c, ninf, _CMP_EQ_OQ));
        m = _mm256_fmadd_ps(s0, _mm256_sub_ps(c, u), u);
        if constexpr (S == 3) {
          const __m256 f = simd::load8(src[2] + i);
          bad = _mm256_or_ps(bad, simd::nan_or_pos_inf(f));
          excluded = _mm256_or_ps(excluded, _mm256_cmp_ps(f, ninf, _CMP_EQ_OQ));
          m = _mm256_fmadd_ps(s1, _mm256_sub_ps(f, c), m);
        }
      }
      const __m256 scaled = _mm256_mul_ps(m, inv_t);
      const __m256 abs_scaled = _mm256_andnot_ps(_mm256_set1_ps(-0.f), scaled);
      bad = _mm256_or_ps(bad, _mm256_andnot_ps(excluded, _mm256_cmp_ps(abs_scaled, inf, _CMP_NLT_UQ)));
      if (mask) excluded = _mm256_or_ps(excluded, simd::masked_out8(mask + i));
      const __m256 zv = _mm256_blendv_ps(scaled, ninf, excluded);
      _mm256_storeu_ps(z + i, zv);
      st.add(zv, bad, excluded);
    }
    return st.result();
  }
#endif
  ChunkStats st{-kInf, 0, false};
  for (int64_t i = begin; i < end; ++i) {
    const float x = mix_one<S>(src, i, mask == nullptr || mask[i], p, st.bad);
    z[i] = x;
    st.max = std::max(st.max, x);
    st.count += x > -kInf;
  }
  return st;
}

ChunkStats contrastive_chunk_scalar(float e, float a, bool allowed, float inv_ta, float* z, float* score,
                                    int64_t i, ChunkStats st) {
  st.bad |= !(e < kInf) | !(a < kInf);
  const bool excluded = (e == -kInf) | (a == -kInf) | !allowed;
  const float s = std::fma(-a, inv_ta, e);
  st.bad |= !excluded & !(std::fabs(s) < kInf);
  z[i] = excluded ? -kInf : e;
  score[i] = s;
  st.max = std::max(st.max, z[i]);
  st.count += !excluded;
  return st;
}

// Contrastive dense pass: z = expert (-inf where excluded), score = fma(-amateur, 1/T_ama, expert).
template <typename T>
ChunkStats contrastive_chunk(const T* e, const T* a, const bool* mask, int64_t begin, int64_t end,
                             float inv_ta, float* z, float* score) {
#if CM3LEON_AVX2
  if (end - begin == kChunk) {
    const __m256 ninf = _mm256_set1_ps(-kInf), inf = _mm256_set1_ps(kInf), ita = _mm256_set1_ps(inv_ta);
    VecChunkStats st;
    for (int64_t i = begin; i < end; i += 8) {
      const __m256 ev = simd::load8(e + i), av = simd::load8(a + i);
      __m256 bad = _mm256_or_ps(simd::nan_or_pos_inf(ev), simd::nan_or_pos_inf(av));
      __m256 excluded = _mm256_or_ps(_mm256_cmp_ps(ev, ninf, _CMP_EQ_OQ), _mm256_cmp_ps(av, ninf, _CMP_EQ_OQ));
      if (mask) excluded = _mm256_or_ps(excluded, simd::masked_out8(mask + i));
      const __m256 s = _mm256_fnmadd_ps(av, ita, ev);
      const __m256 abs_s = _mm256_andnot_ps(_mm256_set1_ps(-0.f), s);
      bad = _mm256_or_ps(bad, _mm256_andnot_ps(excluded, _mm256_cmp_ps(abs_s, inf, _CMP_NLT_UQ)));
      const __m256 zv = _mm256_blendv_ps(ev, ninf, excluded);
      _mm256_storeu_ps(z + i, zv);
      _mm256_storeu_ps(score + i, s);
      st.add(zv, bad, excluded);
    }
    return st.result();
  }
#endif
  ChunkStats st{-kInf, 0, false};
  for (int64_t i = begin; i < end; ++i)
    st = contrastive_chunk_scalar(to_float(e[i]), to_float(a[i]), mask == nullptr || mask[i], inv_ta, z, score, i,
                                  st);
  return st;
}

// z[i] = score[i] / T on the head set (z >= head, finite), -inf elsewhere; returns the chunk's max.
ChunkStats head_scores(float* z, const float* score, int64_t begin, int64_t end, float head, float inv_t) {
  float max = -kInf;
  int64_t i = begin;
#if CM3LEON_AVX2
  if (end - begin == kChunk) {
    const __m256 h = _mm256_set1_ps(head), ninf = _mm256_set1_ps(-kInf), it = _mm256_set1_ps(inv_t);
    __m256 vmax = ninf;
    for (; i < end; i += 8) {
      const __m256 x = _mm256_loadu_ps(z + i);
      const __m256 in = _mm256_and_ps(_mm256_cmp_ps(x, h, _CMP_GE_OQ), _mm256_cmp_ps(x, ninf, _CMP_NEQ_OQ));
      const __m256 v = _mm256_blendv_ps(ninf, _mm256_mul_ps(_mm256_loadu_ps(score + i), it), in);
      _mm256_storeu_ps(z + i, v);
      vmax = _mm256_max_ps(vmax, v);
    }
    max = simd::hmax(vmax);
  }
#endif
  for (; i < end; ++i) {
    z[i] = (z[i] >= head) & (z[i] > -kInf) ? score[i] * inv_t : -kInf;
    max = std::max(max, z[i]);
  }
  return {max, 0, false};
}

// Runs chunk(begin, end) over chunks [c0, c1) of the dense row, recording chunk maxima; returns the totals.
template <typename ChunkFn>
ChunkStats dense_pass(Workspace& ws, int64_t n, int64_t c0, int64_t c1, const ChunkFn& chunk) {
  ChunkStats total{-kInf, 0, false};
  for (int64_t c = c0; c < c1; ++c) {
    const ChunkStats st = chunk(c * kChunk, std::min(n, (c + 1) * kChunk));
    ws.chunk_max[c] = st.max;
    total.max = std::max(total.max, st.max);
    total.count += st.count;
    total.bad |= st.bad;
  }
  return total;
}

// The k-th largest finite z of the dense row (1 <= k <= count), touching only chunks that can hold it.
float kth_largest(Workspace& ws, int64_t n, int64_t k, float max) {
  if (k == 1) return max;
  const int64_t chunks = ceil_div(n, kChunk);
  const float bound = k <= chunks ? select_threshold(ws.chunk_max.data(), nullptr, chunks, double(k), ws) : -kInf;
  const int64_t m = collect(ws, n, bound);
  return select_threshold(ws.value.data(), nullptr, m, double(k), ws);
}

// ---- rows: a dense phase (splittable over chunk ranges) and a finishing phase ---------------------------

// The row's answer: greedy when temperature is 0, else an inverse-CDF draw under threshold t.
RowStatus finish_row(Workspace& ws, int64_t r, int64_t lo, int64_t n, bool greedy, float t, float max,
                     const SeedSpec& seeds, int64_t* tokens, float* logprobs) {
  if (greedy) {
    tokens[r] = lo + first_argmax(ws, ws.z.data(), n, max);
    if (logprobs) logprobs[r] = 0.f;
    return RowStatus::Ok;
  }
  const Draw d = draw_dense(ws, ws.z.data(), n, t, max, row_uniform(seeds, r));
  tokens[r] = lo + d.token;
  if (logprobs) logprobs[r] = d.logprob;
  return RowStatus::Ok;
}

// What both sampling jobs share: the allowed vocabulary, the randomness, and where each row's result goes.
struct RowJob {
  const Vocab& allowed;
  const SeedSpec& seeds;
  int64_t* tokens;
  float* logprobs;

  int64_t width() const { return allowed.range_hi - allowed.range_lo; }
  // Row r's mask from the start of the allowed range, or null.
  const bool* mask_row(int64_t r) const {
    return allowed.mask ? allowed.mask + r * allowed.mask_row_stride + allowed.range_lo : nullptr;
  }
};

template <typename T>
struct CfgJob : RowJob {
  const T* logits;
  int64_t row_stride, stream_stride;
  const CfgOptions& o;

  ChunkStats dense(int64_t r, Workspace& ws, int64_t c0, int64_t c1) const {
    const int64_t lo = allowed.range_lo;
    const T* row = logits + r * row_stride + lo;
    const T* src[3] = {row, row + stream_stride, row + 2 * stream_stride};
    const bool* mask = mask_row(r);
    const MixParams p{o.scale0, o.scale1, o.temperature > 0.f ? 1.f / o.temperature : 1.f};
    float* z = ws.z.data();
    return dense_pass(ws, width(), c0, c1, [&](int64_t b, int64_t e) {
      switch (o.streams) {
        case 1: return cfg_chunk<1>(src, mask, b, e, p, z);
        case 2: return cfg_chunk<2>(src, mask, b, e, p, z);
        default: return cfg_chunk<3>(src, mask, b, e, p, z);
      }
    });
  }

  RowStatus finish(int64_t r, Workspace& ws, const ChunkStats& st) const {
    const int64_t n = width();
    if (st.bad) return RowStatus::NonFinite;
    if (st.count == 0) return RowStatus::EmptyRow;
    // Greedy needs no threshold: every filter keeps the max, so it is the argmax of the mix.
    const bool greedy = o.temperature == 0.f;
    float t = -kInf;
    int64_t m = -1;  // collected candidates in ws.value (-1: none yet)
    if (!greedy && o.top_k > 0 && o.top_k < st.count) {
      const int64_t chunks = ceil_div(n, kChunk);
      const float bound =
          o.top_k <= chunks ? select_threshold(ws.chunk_max.data(), nullptr, chunks, double(o.top_k), ws) : -kInf;
      m = collect(ws, n, bound);
      t = select_threshold(ws.value.data(), nullptr, m, double(o.top_k), ws);
    }
    if (!greedy && o.top_p < 1.0) {
      double mass;
      if (m >= 0) {
        m = keep_at_least(ws.value.data(), m, t);
        mass = weigh(ws.value.data(), m, st.max, ws.weight.data());
      } else {
        mass = dense_weights(ws, ws.z.data(), n, -kInf, st.max);
        // Tokens below this bound hold less than (1 - p) of the mass together: the boundary lies above it.
        const double spare = 0.5 * (1.0 - o.top_p) * mass / double(st.count);
        m = collect(ws, n, float_at_least(double(st.max) + std::log(spare)));
        weigh(ws.value.data(), m, st.max, ws.weight.data());
      }
      t = std::max(t, select_threshold(ws.value.data(), ws.weight.data(), m, o.top_p * mass, ws));
    }
    if (o.min_p > 0.0) t = std::max(t, float_at_least(double(st.max) + std::log(o.min_p)));
    return finish_row(ws, r, allowed.range_lo, n, greedy, t, st.max, seeds, tokens, logprobs);
  }
};

template <typename T>
struct ContrastiveJob : RowJob {
  const T* expert;
  const T* amateur;
  int64_t e_stride, a_stride;
  const ContrastiveOptions& o;

  ChunkStats dense(int64_t r, Workspace& ws, int64_t c0, int64_t c1) const {
    const int64_t lo = allowed.range_lo;
    const T* e = expert + r * e_stride + lo;
    const T* a = amateur + r * a_stride + lo;
    const bool* mask = mask_row(r);
    const float inv_ta = 1.f / o.amateur_temperature;
    float* z = ws.z.data();
    float* score = ws.score.data();
    return dense_pass(ws, width(), c0, c1, [&](int64_t b, int64_t end) {
      return contrastive_chunk(e, a, mask, b, end, inv_ta, z, score);
    });
  }

  RowStatus finish(int64_t r, Workspace& ws, const ChunkStats& st) const {
    const int64_t n = width();
    if (st.bad) return RowStatus::NonFinite;
    if (st.count == 0) return RowStatus::EmptyRow;
    // Head set: p_exp(x) >= alpha * p_exp(k-th) <=> expert_x >= expert_(k) + log(alpha) (normalisers cancel).
    const float kth = kth_largest(ws, n, std::min(o.k, st.count), st.max);
    const float head = o.alpha > 0.0 ? float_at_least(double(kth) + std::log(o.alpha)) : -kInf;
    // Final scores over the head set replace z, with their chunk maxima.
    const float inv_t = o.temperature > 0.f ? 1.f / o.temperature : 1.f;
    float* z = ws.z.data();
    const float* score = ws.score.data();
    const ChunkStats fin = dense_pass(ws, n, 0, ceil_div(n, kChunk), [&](int64_t b, int64_t end) {
      return head_scores(z, score, b, end, head, inv_t);
    });
    if (!(std::fabs(fin.max) < kInf)) return RowStatus::NonFinite;  // score / temperature overflowed
    return finish_row(ws, r, allowed.range_lo, n, o.temperature == 0.f, -kInf, fin.max, seeds, tokens, logprobs);
  }
};

constexpr int64_t kMinChunksPerSplit = 128;  // 8192 tokens: below this a split costs more than it saves

// Runs every row's job in parallel. Batches with fewer rows than threads also split each row's dense pass
// over chunk ranges (the rest of a row is cheap); chunk-local work is identical either way, so the tokens
// do not depend on the thread count.
template <typename Job>
RowError run_rows(int threads, int64_t batch, bool contrastive, const Job& job) {
  if (batch == 0) return {-1, RowStatus::Ok};  // nothing to sample (and the split count below divides by batch)
  std::vector<RowStatus> status(size_t(batch), RowStatus::Ok);
  const int64_t n = job.width(), chunks = ceil_div(n, kChunk);
    const int64_t team = usable_threads(threads);
  const int64_t splits = batch >= team ? 1 : std::min(ceil_div(team, batch), chunks / kMinChunksPerSplit);
  if (splits <= 1) {
    parallel_items(threads, batch, [&](int64_t r) {
      thread_local Workspace ws;
      try {
        ws.reserve(n, contrastive);
      } catch (const std::bad_alloc&) {
        status[size_t(r)] = RowStatus::OutOfMemory;
        return;
      }
      status[size_t(r)] = job.finish(r, ws, job.dense(r, ws, 0, chunks));
    });
  } else {
    thread_local std::vector<Workspace> spaces;  // the calling thread's, reused across calls
    std::vector<ChunkStats> partial(size_t(batch * splits));
    try {
      if (int64_t(spaces.size()) < batch) spaces.resize(size_t(batch));
      for (int64_t r = 0; r < batch; ++r) spaces[size_t(r)].reserve(n, contrastive);
    } catch (const std::bad_alloc&) {
      return {0, RowStatus::OutOfMemory};
    }
    // A plain pointer: inside the parallel lambdas the name `spaces` would mean each worker's own instance.
    Workspace* const row_ws = spaces.data();
    const int64_t per_split = ceil_div(chunks, splits);
    parallel_items(threads, batch * splits, [&](int64_t item) {
      const int64_t r = item / splits, c0 = (item % splits) * per_split;
      partial[size_t(item)] = job.dense(r, row_ws[r], c0, std::min(chunks, c0 + per_split));
    });
    parallel_items(threads, batch, [&](int64_t r) {
      ChunkStats st{-kInf, 0, false};
      for (int64_t s = 0; s < splits; ++s) {
        const ChunkStats& p = partial[size_t(r * splits + s)];
        st.max = std::max(st.max, p.max);
        st.count += p.count;
        st.bad |= p.bad;
      }
      status[size_t(r)] = job.finish(r, row_ws[r], st);
    });
  }
  for (int64_t r = 0; r < batch; ++r)
    if (status[size_t(r)] != RowStatus::Ok) return {r, status[size_t(r)]};
  return {-1, RowStatus::Ok};
}

}  // namespace
CM3LEON_ISA_END

template <>
RowError cfg_sample_kernel<kIsa>(DType dtype, const void* logits, int64_t batch, int64_t row_stride,
                                 int64_t stream_stride, const CfgOptions& options, const Vocab& allowed,
                                 const SeedSpec& seeds, int64_t* tokens, float* logprobs, int threads) {
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const CfgJob<T> job{{allowed, seeds, tokens, logprobs}, static_cast<const T*>(logits), row_stride,
                        stream_stride, options};
    return run_rows(threads, batch, false, job);
  });
}

template <>
RowError contrastive_sample_kernel<kIsa>(DType dtype, const void* expert, const void* amateur, int64_t batch,
                                         int64_t expert_row_stride, int64_t amateur_row_stride,
                                         const ContrastiveOptions& options, const Vocab& allowed,
                                         const SeedSpec& seeds, int64_t* tokens, float* logprobs, int threads) {
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const ContrastiveJob<T> job{{allowed, seeds, tokens, logprobs}, static_cast<const T*>(expert),
                                static_cast<const T*>(amateur), expert_row_stride, amateur_row_stride, options};
    return run_rows(threads, batch, true, job);
  });
}

}  // namespace cm3leon::sampling
