// Torch-free 16-bit float storage types for CPU kernels. Kernels load them once into fp32 and compute in
// fp32: this machine has no fast bf16/fp16 arithmetic, and fp32 accumulation is the contract anyway.
#pragma once
#include <cstdint>
#include <cstring>

#include "common/isa.h"
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace cm3leon {

struct bf16 { uint16_t bits; };
struct fp16 { uint16_t bits; };

CM3LEON_ISA_BEGIN

inline float to_float(float x) { return x; }

inline float to_float(bf16 x) {
  uint32_t u = uint32_t(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float to_float(fp16 x) {
#if defined(__F16C__)
  return _cvtsh_ss(x.bits);
#else
  const uint32_t sign = uint32_t(x.bits & 0x8000) << 16;
  uint32_t exponent = (x.bits >> 10) & 0x1f;
  uint32_t mantissa = x.bits & 0x3ff;
  uint32_t u;
  if (exponent == 0x1f) {
    u = sign | 0x7f800000u | (mantissa << 13);  // inf / nan
  } else if (exponent != 0) {
    u = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    u = sign;  // signed zero
  } else {     // subnormal: renormalise
    exponent = 113;
    while (!(mantissa & 0x400)) { mantissa <<= 1; --exponent; }
    u = sign | (exponent << 23) | ((mantissa & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// Round-to-nearest-even conversions back to storage.
inline void from_float(float f, float* out) { *out = f; }

inline void from_float(float f, bf16* out) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) { out->bits = 0x7fc0; return; }  // quiet nan
  u += 0x7fffu + ((u >> 16) & 1u);
  out->bits = uint16_t(u >> 16);
}

inline void from_float(float f, fp16* out) {
#if defined(__F16C__)
  out->bits = _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000);
  const uint32_t abs = u & 0x7fffffffu;
  if (abs > 0x7f800000u) { out->bits = sign | 0x7e00; return; }
  if (abs >= 0x477ff000u) { out->bits = sign | 0x7c00; return; }  // overflow to inf
  if (abs < 0x38800000u) {  // subnormal or zero in fp16
    float a;
    std::memcpy(&a, &abs, sizeof a);
    out->bits = sign | uint16_t(int(a * 16777216.0f + 0.5f));  // 2^24 scales the smallest subnormal to 1
    return;
  }
  uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
  out->bits = sign | uint16_t((rounded - 0x38000000u) >> 13);
#endif
}

// Elements p and p + 1 of a bf16 row of d elements as one pair, p in the low half (the operand format of the
// bf16 dot-product instructions); 0 for elements past the row's end.
inline uint32_t bf16_pair(const bf16* src, int64_t p, int64_t d) {
  return (p < d ? uint32_t(src[p].bits) : 0u) | (p + 1 < d ? uint32_t(src[p + 1].bits) << 16 : 0u);
}

// Two fp32 values rounded to bf16 (nearest even) as one pair, a in the low half.
inline uint32_t bf16_pair(float a, float b) {
  bf16 lo, hi;
  from_float(a, &lo);
  from_float(b, &hi);
  return uint32_t(lo.bits) | uint32_t(hi.bits) << 16;
}

CM3LEON_ISA_END
}  // namespace cm3leon
