// Row plumbing of the CUDA samplers (torch-free): loading the streams (16-byte vector loads when aligned),
// the fp32 row cache in dynamic shared memory (tokens past its end are recomputed from the inputs, which
// the first pass left in L2), per-row randomness and results, and the launch configuration.
#pragma once
#include <climits>
#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/dtype.h"
#include "common/philox.h"
#include "sampling/sampling_cuda.h"
#include "sampling/sampling_cuda_block.cuh"

namespace cm3leon::sampling::cuda {

// ---- loads ----------------------------------------------------------------------------------------------

__device__ __forceinline__ float load_float(const float* p) { return __ldg(p); }
__device__ __forceinline__ float load_float(const bf16* p) {
  return __uint_as_float(uint32_t(__ldg(reinterpret_cast<const unsigned short*>(p))) << 16);
}
__device__ __forceinline__ float load_float(const fp16* p) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p))));
}

template <typename T>
constexpr int kVec = 16 / int(sizeof(T));  // elements per 16-byte load

// 16 bytes from a 16-byte-aligned p, as floats (little-endian: element 2j is the low half of word j).
__device__ __forceinline__ void load16(const float* p, float* out) {
  const float4 v = __ldg(reinterpret_cast<const float4*>(p));
  out[0] = v.x; out[1] = v.y; out[2] = v.z; out[3] = v.w;
}
__device__ __forceinline__ void load16(const bf16* p, float* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    out[2 * j] = __uint_as_float(w[j] << 16);
    out[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
  }
}
__device__ __forceinline__ void load16(const fp16* p, float* out) {
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    out[2 * j] = __half2float(__ushort_as_half((unsigned short)(w[j] & 0xffffu)));
    out[2 * j + 1] = __half2float(__ushort_as_half((unsigned short)(w[j] >> 16)));
  }
}

// The input streams of one row (at the start of the allowed range) and its mask.
template <typename T>
struct RowInputs {
  const T* src[3];     // streams; unused entries repeat stream 0
  const bool* mask;    // null, or the row's mask at the start of the range
  int64_t n;           // tokens in the allowed range
  int streams;

  __device__ __forceinline__ bool allowed(int64_t i) const { return mask == nullptr || mask[i]; }
  __device__ __forceinline__ bool aligned16() const {
    bool ok = true;
#pragma unroll
    for (int s = 0; s < 3; ++s) ok &= s >= streams || reinterpret_cast<uintptr_t>(src[s]) % 16 == 0;
    return ok;
  }
  __device__ __forceinline__ void load(int64_t i, float* v) const {
#pragma unroll
    for (int s = 0; s < 3; ++s) v[s] = s < streams ? load_float(src[s] + i) : 0.f;
  }
};

// Calls f(i, v) for every token of the row with v its stream values; each thread visits its tokens in
// increasing order (so "first index of the max" is a per-thread running comparison).
template <typename T, class F>
__device__ void for_each_token(const RowInputs<T>& in, F&& f) {
  constexpr int N = kVec<T>;
  int64_t done = 0;
  if (in.aligned16()) {
    const int64_t groups = in.n / N;
    for (int64_t g = threadIdx.x; g < groups; g += kThreads) {
      float v[3][N] = {};
#pragma unroll
      for (int s = 0; s < 3; ++s)
        if (s < in.streams) load16(in.src[s] + g * N, v[s]);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        const float t[3] = {v[0][j], v[1][j], v[2][j]};
        f(g * N + j, t);
      }
    }
    done = groups * N;
  }
  for (int64_t i = done + threadIdx.x; i < in.n; i += kThreads) {
    float t[3];
    in.load(i, t);
    f(i, t);
  }
}

// ---- the row cache --------------------------------------------------------------------------------------

struct RowStats {
  float max;
  long long count;     // tokens with a finite value
  long long argmax;    // first index of the max
  bool bad;
};

// Runs value(i, v, bad) over every token, stores the values of the first `cached` tokens in the cache, and
// reduces max / count / first argmax / bad over the block.
template <typename T, class ValueFn>
__device__ RowStats cache_row(const RowInputs<T>& in, const ValueFn& value, float* cache, int64_t cached,
                              Shared& sh) {
  float best = -kInf;
  long long best_i = LLONG_MAX, count = 0;
  bool bad = false;
  for_each_token(in, [&](int64_t i, const float* v) {
    const float z = value(i, v, bad);
    if (i < cached) cache[i] = z;
    if (z > best) {
      best = z;
      best_i = i;
    }
    count += z > -kInf;
  });
  RowStats st;
  st.bad = __syncthreads_or(bad) != 0;
  st.max = block_all_reduce(best, Max{}, sh);
  st.count = block_all_reduce(count, Plus{}, sh);
  st.argmax = block_all_reduce(best == st.max ? best_i : LLONG_MAX, MinI64{}, sh);
  return st;
}

// The row's values as a selection / draw source: the cache, then recomputation by `row(i)`.
template <class Row>
struct Cached {
  const float* cache;
  int64_t cached;
  Row row;
  __device__ __forceinline__ int64_t size() const { return row.in.n; }
  __device__ __forceinline__ float operator()(int64_t i) const { return i < cached ? cache[i] : row(i); }
};

// ---- randomness, results, errors ------------------------------------------------------------------------

__device__ __forceinline__ double row_uniform(const DeviceSeeds& s, int64_t r) {
  const uint64_t step = s.step_ptr != nullptr ? uint64_t(*s.step_ptr) : s.step;
  if (s.per_row != nullptr) return philox_uniform(uint64_t(s.per_row[r]), 0u, step);
  return philox_uniform(uint64_t(s.shared), uint32_t(r), step);
}

struct Outputs {
  int64_t* tokens;
  float* logprobs;
  long long* status;

  __device__ __forceinline__ void write(int64_t r, int64_t token, float logprob) const {
    if (threadIdx.x == 0) {
      tokens[r] = token;
      logprobs[r] = logprob;
    }
  }
  __device__ __forceinline__ void fail(int64_t r, RowStatus why) const {
    if (threadIdx.x == 0) {
      atomicMin(status, (long long)(r * kStatusRows + int64_t(why)));
      tokens[r] = -1;
      logprobs[r] = __int_as_float(0x7fc00000);  // NaN
    }
  }
};

// log-probability of the drawn value x under weights exp(x - max) / total.
__device__ __forceinline__ float draw_logprob(float x, float max, double total) {
  return float(double(x) - double(max) - log(total));
}

// ---- launch ---------------------------------------------------------------------------------------------

// Fixed-point scale of the top-p weights: 2^(62 - bit length of n), so n weights <= 1 sum below 2^62.
inline float weight_scale(int64_t n) {
  int bits = 0;
  while (bits < 63 && (n >> bits) != 0) ++bits;
  return float(uint64_t(1) << (62 - bits));
}

// How many fp32 tokens of a row the dynamic shared memory holds next to the kernel's static shared memory
// (all of the row when it fits); raises the kernel's dynamic shared memory limit accordingly.
template <typename Kernel>
cudaError_t configure_row_cache(Kernel kernel, int64_t width, int64_t* cached, size_t* bytes) {
  int device = 0, optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  cudaFuncAttributes attr{};
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  const int64_t room = (int64_t(optin) - int64_t(attr.sharedSizeBytes)) / int64_t(sizeof(float4)) * 4;
  *cached = room < 0 ? 0 : (width < room ? width : room);
  *bytes = size_t(*cached) * sizeof(float);
  // The 48 KiB default bounds static + dynamic shared memory together, so opt in past it.
  if (attr.sharedSizeBytes + *bytes > 48 * 1024)
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(*bytes));
  return cudaSuccess;
}

}  // namespace cm3leon::sampling::cuda
