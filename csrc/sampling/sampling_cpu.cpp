// Fused sampling: one row = one short pipeline over a row-sized fp32 workspace (L2-resident), no sort.
//
//   1. dense pass: read the S streams once, mix, restrict, scale by 1/temperature -> z[V] (excluded = -inf),
//      tracking the max, the allowed count and NaN/+inf (branch-free, so it vectorises);
//   2. top-k: the k-th largest z by radix selection (histograms of the order-preserving float key, 11/11/10
//      bits; later levels only see the elements of the chosen bin);
//   3. compact the survivors (z >= threshold) in token order and weigh them w = exp(z - max);
//   4. top-p: the same radix selection, measuring probability mass instead of counts;
//   5. min-p is a plain threshold (max + log min_p), because p(x) / p_max = exp(z - max);
//   6. draw by inverse CDF: one Philox uniform per (seed, row, step) times the total weight, scanned in
//      token order (the total is summed in the same order, so the scan always lands on a survivor).
// Every filter is a threshold on z, so ties at a boundary are all kept and the result does not depend on
// any ordering: a row's token depends only on its logits, options and (seed, row, step).
#include "sampling/sampling_cpu.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <vector>

#include "common/parallel.h"
#include "common/philox.h"

namespace cm3leon::sampling {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// exp(x) for x <= 0 to ~2 ulp: Cody-Waite reduction and a degree-6 polynomial; plain float arithmetic so
// loops over it vectorise (libm's expf does not without -ffast-math).
inline float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;  // exp(-87) ~ 1.6e-38: below it the weight is 0 for every purpose here
  const float shifter = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  const float t = x * 1.44269504f + shifter;
  const float n = t - shifter;
  const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x <= -87.f ? 0.f : p * scale;
}

// Order-preserving map float -> uint32 (larger float, larger key) and back.
inline uint32_t float_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
inline float key_float(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

struct Workspace {
  std::vector<float> z;        // dense [V] (cfg: mixed logits / T; contrastive: expert logits)
  std::vector<float> score;    // contrastive only: dense [V] scores
  std::vector<float> value;    // survivors, token order
  std::vector<int32_t> index;
  std::vector<float> weight;   // exp(value - max)
  std::vector<float> sel_value, sel_weight;  // radix selection's narrowed working set
  std::vector<double> bin_measure;

  void reserve(int64_t vocab, bool contrastive) {
    const size_t v = size_t(vocab);
    if (z.size() < v) {
      z.resize(v);
      value.resize(v);
      index.resize(v);
      weight.resize(v);
      sel_value.resize(v);
      sel_weight.resize(v);
    }
    if (contrastive && score.size() < v) score.resize(v);
    bin_measure.resize(2048);
  }
};

// The largest value t among v[0, n) such that measure({x : v[x] >= t}) >= target, where the measure is the
// element count (w == null) or the sum of w. Three histogram levels over the order-preserving key.
float select_threshold(const float* v, const float* w, int64_t n, double target, Workspace& ws) {
  static constexpr int kShift[3] = {21, 10, 0};
  static constexpr int kBits[3] = {11, 11, 10};
  double* measure = ws.bin_measure.data();
  uint32_t prefix = 0;  // the key bits decided so far (above the current level)
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
    int64_t chosen = -1;
    for (int64_t b = int64_t(bins) - 1; b >= 0; --b) {
      if (measure[b] == 0.0) continue;
      chosen = b;  // falls through to the lowest non-empty bin if rounding keeps `target` out of reach
      if (above + measure[b] >= target) break;
      above += measure[b];
    }
    prefix = (prefix << kBits[level]) | uint32_t(chosen);
    if (level == 2) break;
    // Narrow to the chosen bin (in place after the first level: the output never overtakes the input).
    float* out_v = ws.sel_value.data();
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
  }
  return key_float(prefix);
}

// Keeps the survivors with value >= threshold (in place, token order); returns the new count.
int64_t keep_at_least(Workspace& ws, int64_t n, double threshold) {
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (double(ws.value[i]) >= threshold) {
      ws.value[m] = ws.value[i];
      ws.index[m] = ws.index[i];
      ws.weight[m] = ws.weight[i];
      ++m;
    }
  }
  return m;
}

// Survivors of the dense z (z >= threshold and not excluded) -> ws.value/index, weighed against `max`.
int64_t compact(Workspace& ws, const float* z, int64_t lo, int64_t hi, float threshold, float max) {
  int64_t m = 0;
  for (int64_t i = lo; i < hi; ++i) {
    const float x = z[i - lo];
    if (x >= threshold && x > -kInf) {
      ws.value[m] = x;
      ws.index[m] = int32_t(i);
      ++m;
    }
  }
  for (int64_t i = 0; i < m; ++i) ws.weight[i] = exp_nonpositive(ws.value[i] - max);
  return m;
}

struct Draw {
  int64_t token;
  float logprob;
};

// Inverse-CDF draw over the survivors with uniform u in [0, 1).
Draw draw_inverse_cdf(const Workspace& ws, int64_t n, float max, double u) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += double(ws.weight[i]);
  const double target = u * total;
  double cum = 0.0;
  int64_t pick = -1;
  for (int64_t i = 0; i < n; ++i) {
    if (ws.weight[i] == 0.f) continue;
    pick = i;
    cum += double(ws.weight[i]);
    if (cum > target) break;
  }
  // pick >= 0: the max itself survives every filter and has weight 1.
  return {ws.index[pick], float(double(ws.value[pick]) - double(max) - std::log(total))};
}

inline double row_uniform(const SeedSpec& seeds, int64_t row) {
  if (seeds.per_row) return philox_uniform(uint64_t(seeds.per_row[row]), 0u, seeds.step);
  return philox_uniform(uint64_t(seeds.shared), uint32_t(row), seeds.step);
}

inline bool allowed_at(const Vocab& allowed, int64_t row, int64_t i) {
  return allowed.mask == nullptr || allowed.mask[row * allowed.mask_row_stride + i];
}

// Per-row state reported by the dense pass.
struct DenseStats {
  float max;
  int64_t argmax;   // first index of the max (token id)
  int64_t count;    // allowed tokens
  bool bad;
};

// Max, first argmax and allowed count of z[0, n) (offset lo in token ids).
DenseStats scan_dense(const float* z, int64_t lo, int64_t n, bool bad) {
  float max = -kInf;
  int64_t count = 0;
  for (int64_t i = 0; i < n; ++i) {
    max = z[i] > max ? z[i] : max;
    count += z[i] > -kInf;
  }
  int64_t argmax = lo;
  for (int64_t i = 0; i < n; ++i) {
    if (z[i] == max) { argmax = lo + i; break; }
  }
  return {max, argmax, count, bad};
}

inline bool nan_or_pos_inf(float x) { return !(x < kInf); }

// Dense pass of cfg_sample: z[i - lo] = mix(streams) / T over [lo, hi); excluded tokens get -inf.
template <typename T>
DenseStats cfg_dense(const T* row, int64_t stream_stride, int64_t r, int64_t lo, int64_t hi,
                     const CfgOptions& o, const Vocab& allowed, float* z) {
  const float inv_t = o.temperature > 0.f ? 1.f / o.temperature : 1.f;
  const T* s0 = row;
  const T* s1 = row + stream_stride;
  const T* s2 = row + 2 * stream_stride;
  bool bad = false;
  const int64_t n = hi - lo;
  if (o.streams == 1) {
    for (int64_t i = 0; i < n; ++i) {
      const float u = to_float(s0[lo + i]);
      bad |= nan_or_pos_inf(u);
      z[i] = u * inv_t;
    }
  } else if (o.streams == 2) {
    const float s = o.scale0;
    for (int64_t i = 0; i < n; ++i) {
      const float u = to_float(s0[lo + i]), c = to_float(s1[lo + i]);
      bad |= nan_or_pos_inf(u) | nan_or_pos_inf(c);
      const float mixed = u + s * (c - u);
      const bool excluded = (u == -kInf) | (c == -kInf);
      bad |= !excluded & !(std::fabs(mixed) < kInf);  // overflow of the mix
      z[i] = excluded ? -kInf : mixed * inv_t;
    }
  } else {
    const float s_img = o.scale0, s_txt = o.scale1;
    for (int64_t i = 0; i < n; ++i) {
      const float u = to_float(s0[lo + i]), img = to_float(s1[lo + i]), full = to_float(s2[lo + i]);
      bad |= nan_or_pos_inf(u) | nan_or_pos_inf(img) | nan_or_pos_inf(full);
      const float mixed = u + s_img * (img - u) + s_txt * (full - img);
      const bool excluded = (u == -kInf) | (img == -kInf) | (full == -kInf);
      bad |= !excluded & !(std::fabs(mixed) < kInf);
      z[i] = excluded ? -kInf : mixed * inv_t;
    }
  }
  if (allowed.mask) {
    for (int64_t i = 0; i < n; ++i) z[i] = allowed_at(allowed, r, lo + i) ? z[i] : -kInf;
  }
  return scan_dense(z, lo, n, bad);
}

template <typename T>
RowStatus cfg_row(const T* logits, int64_t r, int64_t vocab, int64_t row_stride, int64_t stream_stride,
                  const CfgOptions& o, const Vocab& allowed, const SeedSpec& seeds, Workspace& ws,
                  int64_t* tokens, float* logprobs) {
  (void)vocab;
  const int64_t lo = allowed.range_lo, hi = allowed.range_hi;
  float* z = ws.z.data();
  const DenseStats st = cfg_dense(logits + r * row_stride, stream_stride, r, lo, hi, o, allowed, z);
  if (st.bad) return RowStatus::NonFinite;
  if (st.count == 0) return RowStatus::EmptyRow;
  if (o.temperature == 0.f) {  // greedy: every filter keeps the max, so it is the argmax of the mix
    tokens[r] = st.argmax;
    if (logprobs) logprobs[r] = 0.f;
    return RowStatus::Ok;
  }
  float threshold = -kInf;
  if (o.top_k > 0 && o.top_k < st.count) threshold = select_threshold(z, nullptr, hi - lo, double(o.top_k), ws);
  int64_t n = compact(ws, z, lo, hi, threshold, st.max);
  if (o.top_p < 1.0) {
    double total = 0.0;
    for (int64_t i = 0; i < n; ++i) total += double(ws.weight[i]);
    const float tp = select_threshold(ws.value.data(), ws.weight.data(), n, o.top_p * total, ws);
    n = keep_at_least(ws, n, tp);
  }
  if (o.min_p > 0.0) n = keep_at_least(ws, n, double(st.max) + std::log(o.min_p));
  const Draw d = draw_inverse_cdf(ws, n, st.max, row_uniform(seeds, r));
  tokens[r] = d.token;
  if (logprobs) logprobs[r] = d.logprob;
  return RowStatus::Ok;
}

// Dense pass of contrastive_sample: z = expert (excluded: -inf), score = expert - amateur / T_ama.
template <typename T>
DenseStats contrastive_dense(const T* expert, const T* amateur, int64_t r, int64_t lo, int64_t hi,
                             const ContrastiveOptions& o, const Vocab& allowed, float* z, float* score) {
  const float inv_ta = 1.f / o.amateur_temperature;
  bool bad = false;
  const int64_t n = hi - lo;
  for (int64_t i = 0; i < n; ++i) {
    const float e = to_float(expert[lo + i]), a = to_float(amateur[lo + i]);
    bad |= nan_or_pos_inf(e) | nan_or_pos_inf(a);
    const bool excluded = (e == -kInf) | (a == -kInf) | !allowed_at(allowed, r, lo + i);
    const float s = e - a * inv_ta;
    bad |= !excluded & !(std::fabs(s) < kInf);
    z[i] = excluded ? -kInf : e;
    score[i] = s;
  }
  return scan_dense(z, lo, n, bad);
}

template <typename T>
RowStatus contrastive_row(const T* expert, const T* amateur, int64_t r, int64_t e_stride, int64_t a_stride,
                          const ContrastiveOptions& o, const Vocab& allowed, const SeedSpec& seeds,
                          Workspace& ws, int64_t* tokens, float* logprobs) {
  const int64_t lo = allowed.range_lo, hi = allowed.range_hi, n_dense = hi - lo;
  float* z = ws.z.data();
  float* score = ws.score.data();
  const DenseStats st =
      contrastive_dense(expert + r * e_stride, amateur + r * a_stride, r, lo, hi, o, allowed, z, score);
  if (st.bad) return RowStatus::NonFinite;
  if (st.count == 0) return RowStatus::EmptyRow;
  // Head set: p_exp(x) >= alpha * p_exp(k-th) <=> expert_x >= expert_(k) + log(alpha) (normalisers cancel).
  const int64_t k = o.k < st.count ? o.k : st.count;
  const float kth = k == 1 ? st.max : select_threshold(z, nullptr, n_dense, double(k), ws);
  const double head = o.alpha > 0.0 ? double(kth) + std::log(o.alpha) : -double(kInf);
  const float inv_t = o.temperature > 0.f ? 1.f / o.temperature : 1.f;
  int64_t n = 0;
  float best = -kInf;
  int64_t best_token = -1;
  for (int64_t i = 0; i < n_dense; ++i) {
    if (z[i] > -kInf && double(z[i]) >= head) {
      const float v = score[i] * inv_t;
      if (v > best) { best = v; best_token = lo + i; }  // strict: ties keep the lowest token id
      ws.value[n] = v;
      ws.index[n] = int32_t(lo + i);
      ++n;
    }
  }
  if (o.temperature == 0.f) {
    tokens[r] = best_token;
    if (logprobs) logprobs[r] = 0.f;
    return RowStatus::Ok;
  }
  for (int64_t i = 0; i < n; ++i) ws.weight[i] = exp_nonpositive(ws.value[i] - best);
  const Draw d = draw_inverse_cdf(ws, n, best, row_uniform(seeds, r));
  tokens[r] = d.token;
  if (logprobs) logprobs[r] = d.logprob;
  return RowStatus::Ok;
}

// Runs row(r, workspace) for every row in parallel; collects the first failing row.
template <typename RowFn>
RowError for_each_row(int64_t batch, int64_t vocab, bool contrastive, const RowFn& row) {
  std::vector<RowStatus> status(size_t(batch), RowStatus::Ok);
  parallel_items(batch, [&](int64_t r) {
    thread_local Workspace ws;
    try {
      ws.reserve(vocab, contrastive);
    } catch (const std::bad_alloc&) {
      status[size_t(r)] = RowStatus::OutOfMemory;
      return;
    }
    status[size_t(r)] = row(r, ws);
  });
  for (int64_t r = 0; r < batch; ++r)
    if (status[size_t(r)] != RowStatus::Ok) return {r, status[size_t(r)]};
  return {-1, RowStatus::Ok};
}

}  // namespace

RowError cfg_sample_cpu(DType dtype, const void* logits, int64_t batch, int64_t vocab, int64_t row_stride,
                        int64_t stream_stride, const CfgOptions& options, const Vocab& allowed,
                        const SeedSpec& seeds, int64_t* tokens, float* logprobs) {
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* x = static_cast<const T*>(logits);
    return for_each_row(batch, vocab, false, [&](int64_t r, Workspace& ws) {
      return cfg_row(x, r, vocab, row_stride, stream_stride, options, allowed, seeds, ws, tokens, logprobs);
    });
  });
}

RowError contrastive_sample_cpu(DType dtype, const void* expert, const void* amateur, int64_t batch,
                                int64_t vocab, int64_t expert_row_stride, int64_t amateur_row_stride,
                                const ContrastiveOptions& options, const Vocab& allowed, const SeedSpec& seeds,
                                int64_t* tokens, float* logprobs) {
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* e = static_cast<const T*>(expert);
    const T* a = static_cast<const T*>(amateur);
    return for_each_row(batch, vocab, true, [&](int64_t r, Workspace& ws) {
      return contrastive_row(e, a, r, expert_row_stride, amateur_row_stride, options, allowed, seeds, ws,
                             tokens, logprobs);
    });
  });
}

}  // namespace cm3leon::sampling
