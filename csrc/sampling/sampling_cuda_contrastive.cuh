// contrastive_sample (CD-K) on the GPU: one 1024-thread block per row (see sampling_cuda_block.cuh).
//   1. one pass over expert and amateur (16-byte loads): z = expert (-inf where excluded) cached in shared
//      memory; max, count and the NaN/+inf/overflow flag by block reductions;
//   2. the k-th largest z by radix selection -> head threshold kth + log(alpha);
//   3. a second pass replaces the cached z by the final scores ((expert - amateur / T_ama) / T on the head
//      set, -inf elsewhere) with their max and first argmax;
//   4. argmax (temperature 0) or the inverse-CDF draw with the row's Philox uniform.
// The fp32 roundings follow sampling_cpu.cpp.
#pragma once
#include "sampling/sampling_cuda_rows.cuh"

namespace cm3leon::sampling::cuda {

template <typename T>
struct ContrastiveRow {
  RowInputs<T> in;  // stream 0 expert, stream 1 amateur
  float inv_ta;     // 1 / amateur temperature
  float head;       // head threshold on the expert logit
  float inv_t;      // 1 / temperature of the scores
  bool final_scores;  // operator() gives the final scores (else the expert logits)

  // Expert logit of a token (-inf where excluded); `bad` is raised for NaN/+inf inputs or a score overflow.
  __device__ __forceinline__ float expert(const float* v, bool allowed, bool& bad) const {
    const float e = v[0], a = v[1];
    bad |= !(e < kInf) || !(a < kInf);
    const bool excluded = e == -kInf || a == -kInf || !allowed;
    const float s = __fmaf_rn(-a, inv_ta, e);
    bad |= !excluded && !(fabsf(s) < kInf);
    return excluded ? -kInf : e;
  }
  // Final score of a token: (expert - amateur / T_ama) / T on the head set, -inf elsewhere.
  __device__ __forceinline__ float score(const float* v, bool allowed) const {
    const float e = v[0], a = v[1];
    const bool excluded = e == -kInf || a == -kInf || !allowed;
    const float z = excluded ? -kInf : e;
    return z >= head && z > -kInf ? mul_rn(__fmaf_rn(-a, inv_ta, e), inv_t) : -kInf;
  }
  __device__ __forceinline__ float operator()(int64_t i) const {
    float v[3];
    in.load(i, v);
    bool ignored = false;
    return final_scores ? score(v, in.allowed(i)) : expert(v, in.allowed(i), ignored);
  }
};

template <typename T>
struct ContrastiveParams {
  const T* expert;
  const T* amateur;
  int64_t expert_row_stride, amateur_row_stride;
  int64_t k;
  bool use_alpha, greedy;
  double log_alpha;
  float inv_ta, inv_t;
  Vocab allowed;
  DeviceSeeds seeds;
  int64_t cached;
  Outputs out;
};

// The kernel parameters of a call; `cached` starts as the row width (the launch lowers it to what fits).
template <typename T>
ContrastiveParams<T> make_contrastive_params(const void* expert, const void* amateur, int64_t expert_row_stride,
                                             int64_t amateur_row_stride, const ContrastiveOptions& o,
                                             double log_alpha, const Vocab& allowed, const DeviceSeeds& seeds,
                                             const Outputs& out) {
  ContrastiveParams<T> p;
  p.expert = static_cast<const T*>(expert);
  p.amateur = static_cast<const T*>(amateur);
  p.expert_row_stride = expert_row_stride;
  p.amateur_row_stride = amateur_row_stride;
  p.k = o.k;
  p.use_alpha = o.alpha > 0.0;
  p.greedy = o.temperature == 0.f;
  p.log_alpha = log_alpha;
  p.inv_ta = 1.f / o.amateur_temperature;
  p.inv_t = o.temperature > 0.f ? 1.f / o.temperature : 1.f;
  p.allowed = allowed;
  p.seeds = seeds;
  p.cached = allowed.range_hi - allowed.range_lo;
  p.out = out;
  return p;
}

// Samples row r (called by every thread of the row's block); `cache` holds p.cached floats.
template <typename T>
__device__ void sample_row(const ContrastiveParams<T>& p, int64_t r, float* cache, Shared& sh) {
  const int64_t lo = p.allowed.range_lo;
  ContrastiveRow<T> row;
  row.in.src[0] = p.expert + r * p.expert_row_stride + lo;
  row.in.src[1] = p.amateur + r * p.amateur_row_stride + lo;
  row.in.src[2] = row.in.src[0];
  row.in.mask = p.allowed.mask ? p.allowed.mask + r * p.allowed.mask_row_stride + lo : nullptr;
  row.in.n = p.allowed.range_hi - lo;
  row.in.streams = 2;
  row.inv_ta = p.inv_ta;
  row.head = -kInf;
  row.inv_t = p.inv_t;
  row.final_scores = false;

  const RowStats st = cache_row(
      row.in, [&](int64_t i, const float* v, bool& bad) { return row.expert(v, row.in.allowed(i), bad); }, cache,
      p.cached, sh);
  if (st.bad) return p.out.fail(r, RowStatus::NonFinite);
  if (st.count == 0) return p.out.fail(r, RowStatus::EmptyRow);
  // Head set: p_exp(x) >= alpha * p_exp(k-th) <=> expert_x >= expert_(k) + log(alpha) (normalisers cancel).
  const int64_t k = p.k < st.count ? p.k : st.count;
  float kth = st.max;
  if (k > 1) {
    const Cached<ContrastiveRow<T>> z{cache, p.cached, row};
    kth = select_threshold(z, -kInf, Measure{false, 0.f, 0.f}, Target{false, double(k)}, true, sh).threshold;
  }
  row.head = p.use_alpha ? float_at_least(double(kth) + p.log_alpha) : -kInf;
  row.final_scores = true;
  // The selection above ended with a barrier, so the cache may be overwritten with the final scores.
  const RowStats fin = cache_row(
      row.in, [&](int64_t i, const float* v, bool&) { return row.score(v, row.in.allowed(i)); }, cache, p.cached,
      sh);
  if (!(fabsf(fin.max) < kInf)) return p.out.fail(r, RowStatus::NonFinite);  // score / temperature overflowed
  if (p.greedy) return p.out.write(r, lo + fin.argmax, 0.f);
  const Cached<ContrastiveRow<T>> scores{cache, p.cached, row};
  const Draw d = draw_inverse_cdf(scores, -kInf, fin.max, row_uniform(p.seeds, r), sh);
  if (threadIdx.x == 0) p.out.write(r, lo + d.index, draw_logprob(scores(d.index), fin.max, d.total));
}

}  // namespace cm3leon::sampling::cuda
