// The exact halves of the CUDA nearest-code search: per-code statistics before the GEMM, and the finaliser
// after it, which merges the code splits' candidates and settles each row in double precision.
//
// Why the answer is exact: the GEMM's score of code j differs from the true score by at most E (a bound per
// row, from the input rounding of the MMA, fp32 accumulation and the rounding of bias/weight; see
// error_bound). Let a1 be a row's best approximate score and `dropped` the lowest approximate score of any
// code outside its candidate set. If dropped - a1 > 2E, every code outside the set is truly worse than the
// code behind a1, so the true nearest code is a candidate, and among candidates only those with
// a_j - a1 <= 2E can be it. Those few are recomputed from z and c in double and compared exactly (ties: lowest
// index). Otherwise (near-ties: duplicated codes, or candidates crowded within 2E) the row is scanned over all
// k codes in double: slower, never wrong. So is every row whose values could overflow the GEMM's fp32.
#pragma once
#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "vq/vq_nearest_cuda_internal.h"

namespace cm3leon::vq::nearest_gpu {

__device__ inline double to_double(float x) { return x; }
__device__ inline double to_double(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ inline double to_double(__half x) { return __half2float(x); }

__device__ inline double warp_sum(double x) {
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// One warp per code: CodeStats and the codebook-wide maxima that enter the error bound.
template <typename T>
__global__ void code_stats_kernel(const T* __restrict__ codebook, int64_t k, int64_t d, bool cosine,
                                  CodeStats* __restrict__ stats, CodebookBounds* __restrict__ bounds) {
  const int64_t code = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (code >= k) return;
  const T* c = codebook + code * d;
  double cc = 0.0;
  for (int64_t i = lane; i < d; i += 32) {
    const double v = to_double(c[i]);
    cc += v * v;
  }
  cc = warp_sum(cc);
  if (lane != 0) return;
  const double norm = sqrt(cc);
  CodeStats s;
  double weight_times_norm;
  if (!cosine) {
    s = {float(cc), -2.f};
    weight_times_norm = 2.0 * norm;
  } else {
    s = {0.f, norm > 0.0 ? float(-2.0 / norm) : 0.f};
    weight_times_norm = norm > 0.0 ? 2.0 : 0.0;
  }
  stats[code] = s;
  // A code holding NaN/inf has no finite distance: it scores NaN/inf, is never a candidate, and stays out of
  // the bounds. A finite code whose fp32 statistics overflow could be missed by the GEMM: its bounds become
  // +inf, so every row is settled by the exact scan instead.
  if (!isfinite(cc)) return;
  const bool representable = isfinite(s.bias) && isfinite(s.weight) && norm < 1e37;
  const auto bound_bits = [&](double v) {  // non-negative floats order like their bit patterns
    return __float_as_uint(representable ? float(v * 1.000001) : __builtin_huge_valf());
  };
  atomicMax(reinterpret_cast<unsigned int*>(&bounds->abs_bias), bound_bits(fabs(double(s.bias))));
  atomicMax(reinterpret_cast<unsigned int*>(&bounds->weight_times_norm), bound_bits(weight_times_norm));
  atomicMax(reinterpret_cast<unsigned int*>(&bounds->norm), bound_bits(norm));
  atomicMax(reinterpret_cast<unsigned int*>(&bounds->weight), bound_bits(fabs(double(s.weight))));
}

// dst[r, :] = src[r, :] followed by zeros up to d_pad (aligned, vector-friendly copies for the GEMM).
template <typename Word>
__global__ void pad_rows_kernel(const Word* __restrict__ src, int64_t rows, int64_t d, int64_t d_pad,
                                Word* __restrict__ dst) {
  const int64_t total = rows * d_pad;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / d_pad, c = i % d_pad;
    dst[i] = c < d ? src[r * d + c] : Word(0);
  }
}

struct FinalizeParams {
  const void* z;
  const void* codebook;
  int64_t n, k, d;
  bool cosine;
  int splits;
  double product_error;  // relative error of one z_i * c_i as the MMA sees it (0 for 16-bit inputs)
  const Candidates* partials;  // [splits, n]
  const CodebookBounds* bounds;
  int64_t* indices;
  float* distance;
  unsigned long long* non_finite_rows;
};

// E for a row of norm zn: |approx - true score| <= (gamma + 2^-22) * zn * max(|w| ||c||) + 2^-22 * max|b|
// + (d + 16) * 2^-125 * max|w|, where gamma bounds |z.c - computed z.c| / sum |z_i c_i| (and sum |z_i c_i|
// <= ||z|| ||c||): input rounding plus fp32 accumulation (taken as (d + 16) * 2^-22 for any tensor-core
// summation order); the 2^-22 terms cover the fp32 rounding of bias, weight and the fused multiply-add, the
// last term products and sums flushed to zero below 2^-126. Doubled for safety.
__device__ inline double error_bound(const FinalizeParams& p, double zn) {
  const double gamma = p.product_error + double(p.d + 16) * 0x1p-22;
  return 2.0 * ((gamma + 0x1p-22) * zn * double(p.bounds->weight_times_norm) +
                0x1p-22 * double(p.bounds->abs_bias) + double(p.d + 16) * 0x1p-125 * double(p.bounds->weight));
}

// The exact distance of row z to code c in double (all lanes get the result).
template <typename T>
__device__ double exact_distance(const T* z, const T* c, int64_t d, bool cosine, double zz) {
  const int lane = threadIdx.x % 32;
  if (!cosine) {
    double acc = 0.0;
    for (int64_t i = lane; i < d; i += 32) {
      const double diff = to_double(z[i]) - to_double(c[i]);
      acc += diff * diff;
    }
    return warp_sum(acc);
  }
  double dot = 0.0, cc = 0.0;
  for (int64_t i = lane; i < d; i += 32) {
    const double zv = to_double(z[i]), cv = to_double(c[i]);
    dot += zv * cv;
    cc += cv * cv;
  }
  dot = warp_sum(dot);
  cc = warp_sum(cc);
  return (zz > 0.0 && cc > 0.0) ? 1.0 - dot / (sqrt(zz) * sqrt(cc)) : 1.0;
}

// The lowest code whose entries are all finite, or -1 when there is none (all lanes get the result). Under the
// cosine metric a zero row is at distance 1 from each such code and NaN from the others, so this is the CPU
// kernel's answer for it (there, a code with a NaN/inf entry normalises to NaN and scores NaN).
template <typename T>
__device__ int64_t first_finite_code(const T* codebook, int64_t k, int64_t d) {
  const int lane = threadIdx.x % 32;
  for (int64_t code = 0; code < k; ++code) {
    bool finite = true;
    for (int64_t i = lane; i < d; i += 32) finite = finite && isfinite(to_double(codebook[code * d + i]));
    if (__all_sync(0xffffffffu, finite)) return code;
  }
  return -1;
}

// One warp per row of z.
template <typename T>
__global__ void finalize_kernel(FinalizeParams p) {
  const int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.n) return;  // whole warps leave together: blockDim.x is a multiple of 32
  const T* z = static_cast<const T*>(p.z) + row * p.d;
  const T* codebook = static_cast<const T*>(p.codebook);

  // Every lane merges the splits redundantly (same loads, no divergence).
  Candidates cand = empty_candidates();
  for (int s = 0; s < p.splits; ++s) {
    const Candidates& part = p.partials[int64_t(s) * p.n + row];
    for (int j = 0; j < kKeep; ++j)
      if (part.index[j] >= 0) offer(cand, part.score[j], part.index[j]);
    cand.dropped = fminf(cand.dropped, part.dropped);
  }

  double zz = 0.0;
  for (int64_t i = lane; i < p.d; i += 32) {
    const double v = to_double(z[i]);
    zz += v * v;
  }
  zz = warp_sum(zz);

  int64_t best_index = -1;
  double best = __builtin_huge_val();
  auto consider = [&](int64_t code) {
    const double dist = exact_distance(z, codebook + code * p.d, p.d, p.cosine, zz);
    if (dist < best || (dist == best && code < best_index)) {  // NaN never wins
      best = dist;
      best_index = code;
    }
  };
  if (p.cosine && zz == 0.0) {
    // A zero vector is at cosine distance 1 from every finite code: the lowest finite one wins; none: the
    // row has no finite distance (counted below, as on the CPU).
    best_index = first_finite_code(codebook, p.k, p.d);
    best = 1.0;
  } else {
    const double zn = sqrt(zz);
    const double margin = 2.0 * error_bound(p, zn);
    const double a1 = cand.score[0];
    // The bound holds while no partial sum or score can overflow fp32 (NaN/inf z fails this test too).
    const bool in_range = zn * double(p.bounds->norm) < 1e37 &&
                          double(p.bounds->abs_bias) + zn * double(p.bounds->weight_times_norm) < 1e37;
    if (in_range && cand.index[0] >= 0 && double(cand.dropped) - a1 > margin) {
      for (int j = 0; j < kKeep; ++j)
        if (cand.index[j] >= 0 && double(cand.score[j]) - a1 <= margin) consider(cand.index[j]);
    } else {
      for (int64_t code = 0; code < p.k; ++code) consider(code);
    }
  }
  if (lane != 0) return;
  if (best_index < 0) {  // every distance was NaN or inf
    atomicAdd(p.non_finite_rows, 1ull);
    p.indices[row] = 0;
    p.distance[row] = __int_as_float(0x7fc00000);
    return;
  }
  p.indices[row] = best_index;
  p.distance[row] = float(best);
}

}  // namespace cm3leon::vq::nearest_gpu
