// Scalar float helpers of the samplers, host and device: the CPU and CUDA kernels run the same sequence of
// fp32 operations (explicit fma), so a token's weight and every threshold come out bit-identical on both.
#pragma once
#include "common/isa.h"
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define CM3LEON_SAMPLING_HD __host__ __device__ __forceinline__
#else
#define CM3LEON_SAMPLING_HD inline
#endif

namespace cm3leon::sampling {
CM3LEON_ISA_BEGIN

// a - b and a * b rounded on their own: nvcc may otherwise contract a product with a later add into an fma,
// and the kernels must round every weight exactly as the CPU does.
CM3LEON_SAMPLING_HD float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
CM3LEON_SAMPLING_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// exp(x) for x <= 0 to ~2 ulp (Cody-Waite reduction, degree-6 Taylor); exactly 0 at or below -87.
CM3LEON_SAMPLING_HD float exp_nonpositive(float x) {
  const float xc = x < -87.f ? -87.f : x;
  const float shifter = 12582912.f;  // 1.5 * 2^23: adding it rounds to an integer in the low mantissa bits
  const float n = sub_rn(fmaf(xc, 1.44269504f, shifter), shifter);
  float r = fmaf(n, -0.693145752f, xc);
  r = fmaf(n, -1.42860677e-6f, r);
  float p = 1.f / 720.f;
  p = fmaf(p, r, 1.f / 120.f);
  p = fmaf(p, r, 1.f / 24.f);
  p = fmaf(p, r, 1.f / 6.f);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.f);
  p = fmaf(p, r, 1.f);
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x <= -87.f ? 0.f : mul_rn(p, scale);
}

// Order-preserving map float -> uint32 (larger float, larger key) and back.
CM3LEON_SAMPLING_HD uint32_t float_key(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
CM3LEON_SAMPLING_HD float key_float(uint32_t k) {
  const uint32_t u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// The smallest float f with f >= t, so `z >= t` and `z >= f` agree for every float z.
CM3LEON_SAMPLING_HD float float_at_least(double t) {
  const float inf = std::numeric_limits<float>::infinity();
  if (t == -double(inf)) return -inf;
  float f = float(t);
  if (double(f) < t) f = nextafterf(f, inf);
  return f;
}

CM3LEON_ISA_END
}  // namespace cm3leon::sampling
