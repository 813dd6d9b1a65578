// AMX tiles for bf16 products (torch-free, header-only): the tile configuration and a 32 x 32 fp32 block
// product from bf16 pairs, shared by the kernels with an amx_bf16 level. kAmx is false (and the helpers are
// absent) in objects compiled for other levels.
#pragma once
#include "common/isa.h"
#include <cstdint>
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#endif

namespace cm3leon {
CM3LEON_ISA_BEGIN

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
constexpr bool kAmx = true;

// Eight tiles of 16 rows x 64 bytes: C00 C01 C10 C11 (fp32 16 x 16), A0 A1 (16 rows x 16 pairs), B0 B1
// (16 pairs x 16 columns). The configuration is per thread: a kernel configures it on each thread that runs
// amx_block (for the lifetime of the session) and releases it afterwards.
class AmxSession {
 public:
  explicit AmxSession(bool on = true) : on_(on) {
    if (!on_) return;
    alignas(64) uint8_t config[64] = {};
    config[0] = 1;  // palette 1
    for (int t = 0; t < 8; ++t) {
      config[16 + 2 * t] = 64;  // bytes per row
      config[48 + t] = 16;      // rows
    }
    _tile_loadconfig(config);
  }
  ~AmxSession() {
    if (on_) _tile_release();
  }
  AmxSession(const AmxSession&) = delete;
  AmxSession& operator=(const AmxSession&) = delete;

 private:
  bool on_;
};

// c[r * ldc + j] (+)= sum_p dot(a[r * lda + p], b[p * ldb + j]) for r, j < 32 and p < pairs (a multiple of 16),
// a and b holding bf16 pairs (bf16_pair; strides in uint32 words). Products are exact, sums fp32.
inline void amx_block(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t pairs, float* c,
                      int64_t ldc, bool accumulate) {
  const int64_t sa = lda * 4, sb = ldb * 4, sc = ldc * 4;  // strides in bytes
  if (accumulate) {
    _tile_loadd(0, c, sc); _tile_loadd(1, c + 16, sc);
    _tile_loadd(2, c + 16 * ldc, sc); _tile_loadd(3, c + 16 * ldc + 16, sc);
  } else {
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  }
  for (int64_t p0 = 0; p0 < pairs; p0 += 16) {
    _tile_loadd(4, a + p0, sa);
    _tile_loadd(5, a + 16 * lda + p0, sa);
    _tile_loadd(6, b + p0 * ldb, sb);
    _tile_loadd(7, b + p0 * ldb + 16, sb);
    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, sc); _tile_stored(1, c + 16, sc);
  _tile_stored(2, c + 16 * ldc, sc); _tile_stored(3, c + 16 * ldc + 16, sc);
}
#else
constexpr bool kAmx = false;
class AmxSession {
 public:
  explicit AmxSession(bool = true) {}
};
inline void amx_block(const uint32_t*, int64_t, const uint32_t*, int64_t, int64_t, float*, int64_t, bool) {}
#endif

CM3LEON_ISA_END
}  // namespace cm3leon
