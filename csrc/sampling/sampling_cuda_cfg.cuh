// cfg_sample on the GPU: one 1024-thread block per row (see sampling_cuda_block.cuh for the machinery).
//   1. one pass over the S streams (16-byte loads): mix, restrict, 1/temperature -> z, cached in shared
//      memory; block reductions give the max, the first argmax, the allowed count and the NaN/+inf flag;
//   2. top-k: radix selection of the k-th largest z (counts);
//   3. top-p: radix selection weighted by exp(z - max) over z >= the top-k threshold (over the top-k
//      candidates when they fit in shared memory);
//   4. min-p: the constant threshold max + log(min_p);
//   5. inverse-CDF draw in token order with the row's Philox uniform.
// The order of operations and every fp32 rounding follow sampling_cpu.cpp.
#pragma once
#include "sampling/sampling_cuda_rows.cuh"

namespace cm3leon::sampling::cuda {

// The mixed, restricted, tempered logits of one row.
template <typename T>
struct CfgRow {
  RowInputs<T> in;
  float s0, s1, inv_t;

  // z of a token from its stream values (u, c, f); `bad` is raised for NaN/+inf inputs or an overflow.
  __device__ __forceinline__ float token(const float* v, bool allowed, bool& bad) const {
    const float u = v[0];
    bool b = !(u < kInf), excluded = u == -kInf;
    float m = u;
    if (in.streams >= 2) {
      const float c = v[1];
      b |= !(c < kInf);
      excluded |= c == -kInf;
      m = __fmaf_rn(s0, sub_rn(c, u), u);
      if (in.streams == 3) {
        const float f = v[2];
        b |= !(f < kInf);
        excluded |= f == -kInf;
        m = __fmaf_rn(s1, sub_rn(f, c), m);
      }
    }
    const float scaled = mul_rn(m, inv_t);
    b |= !excluded && !(fabsf(scaled) < kInf);
    bad |= b;
    return (excluded || !allowed) ? -kInf : scaled;
  }
  __device__ __forceinline__ float operator()(int64_t i) const {
    float v[3];
    in.load(i, v);
    bool ignored = false;
    return token(v, in.allowed(i), ignored);
  }
};

template <typename T>
struct CfgParams {
  const T* logits;
  int64_t row_stride, stream_stride;
  int streams;
  float s0, s1, inv_t;
  bool greedy, use_min_p;
  int64_t top_k;
  double top_p, log_min_p;
  float weight_scale;
  Vocab allowed;
  DeviceSeeds seeds;
  int64_t cached;
  Outputs out;
};

// The kernel parameters of a call; `cached` starts as the row width (the launch lowers it to what fits).
template <typename T>
CfgParams<T> make_cfg_params(const void* logits, int64_t row_stride, int64_t stream_stride, const CfgOptions& o,
                             double log_min_p, const Vocab& allowed, const DeviceSeeds& seeds, const Outputs& out) {
  CfgParams<T> p;
  p.logits = static_cast<const T*>(logits);
  p.row_stride = row_stride;
  p.stream_stride = stream_stride;
  p.streams = int(o.streams);
  p.s0 = o.scale0;
  p.s1 = o.scale1;
  p.inv_t = o.temperature > 0.f ? 1.f / o.temperature : 1.f;  // as the CPU kernel (float division)
  p.greedy = o.temperature == 0.f;
  p.use_min_p = o.min_p > 0.0;
  p.top_k = o.top_k;
  p.top_p = o.top_p;
  p.log_min_p = log_min_p;
  p.cached = allowed.range_hi - allowed.range_lo;
  p.weight_scale = weight_scale(p.cached);
  p.allowed = allowed;
  p.seeds = seeds;
  p.out = out;
  return p;
}

// Samples row r (called by every thread of the row's block); `cache` holds p.cached floats.
template <typename T>
__device__ void sample_row(const CfgParams<T>& p, int64_t r, float* cache, Shared& sh) {
  const int64_t lo = p.allowed.range_lo;
  CfgRow<T> row;
  const T* base = p.logits + r * p.row_stride + lo;
  for (int s = 0; s < 3; ++s) row.in.src[s] = base + (s < p.streams ? s : 0) * p.stream_stride;
  row.in.mask = p.allowed.mask ? p.allowed.mask + r * p.allowed.mask_row_stride + lo : nullptr;
  row.in.n = p.allowed.range_hi - lo;
  row.in.streams = p.streams;
  row.s0 = p.s0;
  row.s1 = p.s1;
  row.inv_t = p.inv_t;

  const RowStats st = cache_row(
      row.in, [&](int64_t i, const float* v, bool& bad) { return row.token(v, row.in.allowed(i), bad); }, cache,
      p.cached, sh);
  if (st.bad) return p.out.fail(r, RowStatus::NonFinite);
  if (st.count == 0) return p.out.fail(r, RowStatus::EmptyRow);
  // Greedy needs no threshold: every filter keeps the max.
  if (p.greedy) return p.out.write(r, lo + st.argmax, 0.f);

  const Cached<CfgRow<T>> z{cache, p.cached, row};
  float t = -kInf;
  int64_t candidates = -1;  // top-k's candidates left in shared memory
  if (p.top_k == 1 && st.count > 1) {  // top-1 keeps the max (and its ties): no selection needed
    t = st.max;
  } else if (p.top_k > 0 && p.top_k < st.count) {
    const Selection k = select_threshold(z, -kInf, Measure{false, 0.f, 0.f}, Target{false, double(p.top_k)},
                                         true, sh);
    t = k.threshold;
    candidates = k.candidates;
  }
  if (p.top_p < 1.0) {
    const Measure mass{true, st.max, p.weight_scale};
    const Target nucleus{true, p.top_p};
    const Selection s = candidates >= 0
        ? select_threshold(Candidates{sh.candidates, candidates}, t, mass, nucleus, false, sh)
        : select_threshold(z, t, mass, nucleus, true, sh);
    t = fmaxf(t, s.threshold);
  }
  if (p.use_min_p) t = fmaxf(t, float_at_least(double(st.max) + p.log_min_p));
  const Draw d = draw_inverse_cdf(z, t, st.max, row_uniform(p.seeds, r), sh);
  if (threadIdx.x == 0) p.out.write(r, lo + d.index, draw_logprob(z(d.index), st.max, d.total));
}

}  // namespace cm3leon::sampling::cuda
