// Counter-based random numbers: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2,
// 3", SC'11). Header-only and torch-free; every function is host+device so the CPU and CUDA samplers draw
// bit-identical uniforms from the same (key, counter).
//
// Sampling streams (docs/sampling.md): key = the 64-bit seed, counter = (0, row, step_lo, step_hi).
// Counter word 0 numbers the draws of one (seed, row, step); the samplers use draw 0 only.
// Attention dropout's stream (attention/attention_dropout.h) tags counter word 3 with a constant instead.
#pragma once
#include "common/isa.h"
#include <cstdint>

#if defined(__CUDACC__)
#define CM3LEON_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define CM3LEON_HOST_DEVICE inline
#endif

namespace cm3leon {
CM3LEON_ISA_BEGIN

struct Philox4x32 {
  uint32_t v[4];
};

namespace philox_detail {
constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;   // round multipliers
constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;  // key schedule (golden ratio, sqrt(3) - 1)

CM3LEON_HOST_DEVICE void mulhilo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = uint64_t(a) * uint64_t(b);
  *hi = uint32_t(p >> 32);
  *lo = uint32_t(p);
}
}  // namespace philox_detail

// The ten-round Philox4x32 bijection of `counter` under `key`.
CM3LEON_HOST_DEVICE Philox4x32 philox4x32_10(Philox4x32 counter, uint32_t key0, uint32_t key1) {
  using namespace philox_detail;
  uint32_t c0 = counter.v[0], c1 = counter.v[1], c2 = counter.v[2], c3 = counter.v[3];
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kMul0, c0, &hi0, &lo0);
    mulhilo(kMul1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ key0, n2 = hi0 ^ c3 ^ key1;
    c0 = n0; c1 = lo1; c2 = n2; c3 = lo0;
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// The uniform in [0, 1) of draw `draw` of the sampling stream (seed, row, step): the top 53 bits of the
// first two output words, so it is exact in double precision.
CM3LEON_HOST_DEVICE double philox_uniform(uint64_t seed, uint32_t row, uint64_t step, uint32_t draw = 0) {
  const Philox4x32 out = philox4x32_10(Philox4x32{{draw, row, uint32_t(step), uint32_t(step >> 32)}},
                                       uint32_t(seed), uint32_t(seed >> 32));
  const uint64_t bits = (uint64_t(out.v[0]) << 21) | (out.v[1] >> 11);
  return double(bits) * (1.0 / 9007199254740992.0);  // 2^-53
}

CM3LEON_ISA_END
}  // namespace cm3leon
