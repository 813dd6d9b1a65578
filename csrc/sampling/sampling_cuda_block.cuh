// Block-wide building blocks of the CUDA samplers (torch-free): one thread block owns one row.
//
//   * reductions and scans over the 1024 threads (warp shuffles in a fixed order: deterministic);
//   * radix selection of a threshold on the row's values: histograms of the order-preserving 32-bit key
//     (11/11/10 bits, as the CPU kernel) with integer measures (counts, or fixed-point probability weights),
//     so the result never depends on the order atomics land in; after the first level the elements of the
//     chosen bin and above are compacted into shared memory when they fit, and the later levels scan only
//     them;
//   * the inverse-CDF draw in token order: each warp owns a contiguous slice of the row, the warp totals are
//     prefix-summed, and the warp holding the target re-scans its slice 32 tokens at a time.
// No sort anywhere. Every function here is called by all threads of the block (it holds __syncthreads).
#pragma once
#include <cstdint>
#include <cuda_runtime.h>

#include "sampling/sampling_math.h"

namespace cm3leon::sampling::cuda {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
static_assert(kWarps == 32, "block reductions hand each lane of a warp one warp's partial");
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kRadixBins = 2048;    // widest radix level: 11 bits
constexpr int kCandidates = 4096;   // shared-memory candidate buffer (floats)
constexpr float kInf = __builtin_huge_valf();

// Static shared memory of one row's block; the fp32 row cache is the dynamic shared memory.
struct Shared {
  unsigned long long hist[kRadixBins];
  float candidates[kCandidates];
  unsigned long long scratch[kWarps];  // reductions (reinterpreted as the reduced type; 8 bytes per warp)
  double warp_total[kWarps];           // draw: each warp's weight
  unsigned long long above, target;    // selection state: measure above the current bin range; the target
  uint32_t prefix;                     // selection state: key bits decided so far
  int candidate_count;
  int pick_warp;
  long long pick;
  double cum_before, draw_target, total;
};

__device__ __forceinline__ int lane() { return int(threadIdx.x) & 31; }
__device__ __forceinline__ int warp() { return int(threadIdx.x) >> 5; }

// Calls f(i, valid) for i = warp base + lane over [0, n): all lanes of a warp run the same iterations (so the
// body may use full-mask warp intrinsics); `valid` is i < n.
template <typename F>
__device__ __forceinline__ void for_each_warp_uniform(int64_t n, F&& f) {
  for (int64_t base = int64_t(warp()) * 32; base < n; base += kThreads) f(base + lane(), base + lane() < n);
}

template <typename T, typename Op>
__device__ __forceinline__ T warp_all_reduce(T v, Op op) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o));
  return v;  // xor butterfly: every lane ends with the same value, computed in the same order
}

// Reduction over the block; every thread gets the result. T is at most 8 bytes.
template <typename T, typename Op>
__device__ T block_all_reduce(T v, Op op, Shared& sh) {
  static_assert(sizeof(T) <= sizeof(unsigned long long));
  T* scratch = reinterpret_cast<T*>(sh.scratch);
  v = warp_all_reduce(v, op);
  __syncthreads();  // earlier readers of the scratch are done
  if (lane() == 0) scratch[warp()] = v;
  __syncthreads();
  return warp_all_reduce(scratch[lane()], op);
}

struct Max { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };
struct Plus {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct MinI64 { __device__ long long operator()(long long a, long long b) const { return a < b ? a : b; } };

// Inclusive prefix sum over the threads in thread order; *total gets the sum of all.
__device__ inline unsigned long long block_inclusive_scan(unsigned long long v, unsigned long long* total,
                                                          Shared& sh) {
  const int l = lane(), w = warp();
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long n = __shfl_up_sync(kFullMask, v, o);
    if (l >= o) v += n;
  }
  __syncthreads();
  if (l == 31) sh.scratch[w] = v;
  __syncthreads();
  unsigned long long warps = sh.scratch[l];  // every warp scans the 32 warp totals itself
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned long long n = __shfl_up_sync(kFullMask, warps, o);
    if (l >= o) warps += n;
  }
  const unsigned long long before = __shfl_sync(kFullMask, warps, (w + 31) & 31);
  *total = __shfl_sync(kFullMask, warps, 31);
  return v + (w == 0 ? 0ull : before);
}

// ---- radix selection ------------------------------------------------------------------------------------

__device__ __forceinline__ int radix_shift(int level) { return level == 0 ? 21 : level == 1 ? 10 : 0; }
__device__ __forceinline__ int radix_bits(int level) { return level == 2 ? 10 : 11; }

// What an element weighs in a selection: 1 (top-k), or its probability weight exp(x - max) in fixed point
// (top-p). Integers add associatively, so histograms built by atomics are exact and order-independent.
// `scale` = 2^(62 - bit length of the row width) keeps any row's total below 2^62.
struct Measure {
  bool weighted;
  float max, scale;
  __device__ __forceinline__ unsigned long long operator()(float x) const {
    if (!weighted) return 1ull;
    return __float2ull_rn(mul_rn(exp_nonpositive(sub_rn(x, max)), scale));
  }
};

// The measure a selection must reach: an absolute count (top-k), or a fraction of the total (top-p, resolved
// to ceil(fraction * total) once the first histogram gives the total).
struct Target {
  bool relative;
  double value;
  __device__ __forceinline__ unsigned long long resolve(unsigned long long total) const {
    if (!relative) return (unsigned long long)value;
    const unsigned long long t = (unsigned long long)ceil(value * double(total));
    return t < 1ull ? 1ull : (t > total ? total : t);
  }
};

// The elements a selection counts: finite, >= floor.
__device__ __forceinline__ bool selectable(float x, float floor) { return x >= floor && x > -kInf; }

// Histogram of level `level` over the selectable elements of src whose higher key bits equal `prefix`.
template <class Src>
__device__ void radix_histogram(const Src& src, int level, uint32_t prefix, float floor, const Measure& m,
                                Shared& sh) {
  __syncthreads();  // earlier readers of the histogram are done
  for (int b = threadIdx.x; b < kRadixBins; b += kThreads) sh.hist[b] = 0ull;
  __syncthreads();
  const int shift = radix_shift(level), high = shift + radix_bits(level);
  const uint32_t bin_mask = (1u << radix_bits(level)) - 1u;
  for_each_warp_uniform(src.size(), [&](int64_t i, bool valid) {
    const float x = valid ? src(i) : -kInf;
    const uint32_t key = float_key(x);
    const bool in = valid && selectable(x, floor) && (level == 0 || (key >> high) == prefix);
    const uint32_t bin = (key >> shift) & bin_mask;
    if (!m.weighted) {  // counts: one atomic per distinct bin of the warp
      const unsigned peers = __match_any_sync(kFullMask, in ? bin : 0xffffffffu);
      if (in && lane() == __ffs(peers) - 1) atomicAdd(&sh.hist[bin], (unsigned long long)__popc(peers));
    } else if (in) {
      atomicAdd(&sh.hist[bin], m(x));
    }
  });
  __syncthreads();
}

// Picks the highest bin whose measure, plus everything above it, reaches the target; appends it to the
// prefix. Thread t owns bins 2047 - 2t and 2046 - 2t, so the thread-order scan is a suffix sum over bins.
__device__ inline void radix_choose(int level, const Target& target_spec, Shared& sh) {
  const int hi = kRadixBins - 1 - 2 * int(threadIdx.x), lo = hi - 1;
  const unsigned long long h_hi = sh.hist[hi], h_lo = sh.hist[lo];
  const unsigned long long above = sh.above;
  const uint32_t prefix = sh.prefix;
  const unsigned long long level_target = level == 0 ? 0ull : sh.target;  // set by level 0
  unsigned long long total;
  const unsigned long long incl = block_inclusive_scan(h_hi + h_lo, &total, sh);  // syncs: reads above are done
  const unsigned long long target = level == 0 ? target_spec.resolve(total) : level_target;
  const unsigned long long s_lo = above + incl, s_hi = s_lo - h_lo, s_above = s_hi - h_hi;
  // Exactly one thread sees the crossing: suffix sums fall monotonically and above < target <= above + total.
  int chosen = -1;
  unsigned long long new_above = 0;
  if (s_above < target && s_hi >= target) {
    chosen = hi;
    new_above = s_above;
  } else if (s_hi < target && s_lo >= target) {
    chosen = lo;
    new_above = s_hi;
  }
  if (chosen >= 0) {
    sh.prefix = (prefix << radix_bits(level)) | uint32_t(chosen);
    sh.above = new_above;
    sh.target = target;
  }
  __syncthreads();
}

// A shared-memory array as a selection source.
struct Candidates {
  const float* values;
  int64_t count;
  __device__ __forceinline__ int64_t size() const { return count; }
  __device__ __forceinline__ float operator()(int64_t i) const { return values[i]; }
};

// Copies the selectable elements of src with key >= min_key into sh.candidates (in any order: selections
// do not depend on it); returns how many there are (more than kCandidates: the buffer is incomplete).
template <class Src>
__device__ int64_t collect_candidates(const Src& src, uint32_t min_key, float floor, Shared& sh) {
  __syncthreads();  // earlier readers of candidate_count are done
  if (threadIdx.x == 0) sh.candidate_count = 0;
  __syncthreads();
  for_each_warp_uniform(src.size(), [&](int64_t i, bool valid) {
    const float x = valid ? src(i) : -kInf;
    const bool in = valid && selectable(x, floor) && float_key(x) >= min_key;
    const unsigned ballot = __ballot_sync(kFullMask, in);
    if (ballot == 0u) return;
    int base = 0;
    if (lane() == 0) base = atomicAdd(&sh.candidate_count, __popc(ballot));
    base = __shfl_sync(kFullMask, base, 0);
    const int slot = base + __popc(ballot & ((1u << lane()) - 1u));
    if (in && slot < kCandidates) sh.candidates[slot] = x;
  });
  __syncthreads();
  return sh.candidate_count;
}

template <class Src>
__device__ float radix_finish(const Src& src, float floor, const Measure& m, const Target& target, Shared& sh) {
  for (int level = 1; level < 3; ++level) {
    radix_histogram(src, level, sh.prefix, floor, m, sh);
    radix_choose(level, target, sh);
  }
  return key_float(sh.prefix);  // 32 bits decided: the exact value of an element
}

struct Selection {
  float threshold;
  int64_t candidates;  // elements left in sh.candidates (all selectable x >= some bound <= threshold), or -1
};

// The largest value t among the selectable elements of src with measure({x : x >= t}) >= target, where the
// target must not exceed the total measure. With `compact`, the elements from the first level's bin up are
// gathered into sh.candidates (kept there for a later selection) when they fit.
template <class Src>
__device__ Selection select_threshold(const Src& src, float floor, const Measure& m, const Target& target,
                                      bool compact, Shared& sh) {
  __syncthreads();  // earlier readers of the selection state are done
  if (threadIdx.x == 0) {
    sh.prefix = 0u;
    sh.above = 0ull;
  }
  radix_histogram(src, 0, 0u, floor, m, sh);
  radix_choose(0, target, sh);
  if (compact) {
    const int64_t n = collect_candidates(src, sh.prefix << radix_shift(0), floor, sh);
    if (n <= kCandidates) return {radix_finish(Candidates{sh.candidates, n}, floor, m, target, sh), n};
  }
  return {radix_finish(src, floor, m, target, sh), -1};
}

// ---- inverse-CDF draw -----------------------------------------------------------------------------------

// Weight of an element under threshold t: exp(x - max) if x >= t, else 0 (bit-identical to the CPU's).
__device__ __forceinline__ float weight_at(float x, float t, float max) {
  return x >= t ? exp_nonpositive(sub_rn(x, max)) : 0.f;
}

struct Draw {
  int64_t index;
  double total;  // sum of the weights
};

// Draws index i of src with probability weight_at(src(i)) / total, by inverse CDF of u in index order.
// Warp w owns the contiguous slice [w * per_warp, (w + 1) * per_warp); sums run slice by slice in a fixed
// order, so the draw is deterministic. Requires a positive total (the max has weight 1 and passes every t).
template <class Src>
__device__ Draw draw_inverse_cdf(const Src& src, float t, float max, double u, Shared& sh) {
  const int64_t n = src.size();
  const int64_t per_warp = ((n + kWarps - 1) / kWarps + 31) / 32 * 32;
  const int64_t begin = min(n, int64_t(warp()) * per_warp), end = min(n, begin + per_warp);
  auto slice_weight = [&](int64_t s, float* mine) {  // the 32 tokens from s: lane's weight, warp total
    const int64_t i = s + lane();
    *mine = i < end ? weight_at(src(i), t, max) : 0.f;
    return warp_all_reduce(*mine, Plus{});
  };
  double acc = 0.0;
  for (int64_t s = begin; s < end; s += 32) {
    float mine;
    acc += double(slice_weight(s, &mine));
  }
  __syncthreads();  // earlier readers of the draw state are done
  if (lane() == 0) sh.warp_total[warp()] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < kWarps; ++w) total += sh.warp_total[w];
    const double target = u * total;
    double cum = 0.0;
    int chosen = -1;
    for (int w = 0; w < kWarps; ++w) {
      if (sh.warp_total[w] == 0.0) continue;
      chosen = w;
      if (cum + sh.warp_total[w] > target) break;
      cum += sh.warp_total[w];
    }
    sh.pick_warp = chosen;
    sh.pick = 0;  // overwritten by the chosen warp (chosen >= 0 whenever the total is positive)
    sh.cum_before = cum;
    sh.draw_target = target;
    sh.total = total;
  }
  __syncthreads();
  if (warp() == sh.pick_warp) {
    // Re-scan the chosen slice with the same slice sums; inside the crossing slice a lane-order prefix sum
    // finds the token. Its additions are ordered differently from the slice sum, so if rounding keeps the
    // target out of reach, the last positive weight is taken (as the CPU kernel does in its chunk).
    const double target = sh.draw_target;
    double cum = sh.cum_before;
    long long found = -1, last_positive = -1;
    for (int64_t s = begin; s < end; s += 32) {
      float mine;
      const float slice = slice_weight(s, &mine);
      if (slice == 0.f) continue;
      float prefix = mine;
      for (int o = 1; o < 32; o <<= 1) {
        const float v = __shfl_up_sync(kFullMask, prefix, o);
        if (lane() >= o) prefix += v;
      }
      const unsigned positive = __ballot_sync(kFullMask, mine > 0.f);
      last_positive = s + 31 - __clz(positive);
      if (cum + double(slice) > target) {
        const unsigned hit = __ballot_sync(kFullMask, mine > 0.f && cum + double(prefix) > target);
        found = hit ? s + __ffs(hit) - 1 : last_positive;
        break;
      }
      cum += double(slice);
    }
    if (lane() == 0) sh.pick = found >= 0 ? found : last_positive;
  }
  __syncthreads();
  return {sh.pick, sh.total};
}

}  // namespace cm3leon::sampling::cuda
