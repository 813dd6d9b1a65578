// Forced include (-include) for compiling a kernel level on a CPU without it, for tests/isa_oracle.cpp, by the
// level being built (CM3LEON_ISA_LEVEL): the host's own intrinsics first, then SIMDe's portable
// implementations of the AVX-512 and AVX-512 BF16 intrinsics under their usual names, AMX tiles emulated in
// memory below, and the feature macros the kernel sources test. The objects contain no AVX-512 or AMX
// instruction; they run those levels' logic (16 lanes, mask registers, the 6 x 32 tile, bf16 pairs, tile
// blocks) with AVX2.
#pragma once
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define __AVX512F__ 1
#define __AVX512DQ__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#if CM3LEON_ISA_LEVEL >= 3
#define __AVX512BF16__ 1
#endif

#if CM3LEON_ISA_LEVEL >= 4
// AMX: eight tile registers per thread, configured from the 64-byte palette-1 layout, and tdpbf16ps as the
// architecture defines it (per row m and column n: two bf16 products per pair k added in order, fp32).
namespace isa_emulation {
struct Tiles {
  uint8_t data[8][16][64];
  int rows[8], colsb[8];
};
inline Tiles& tiles() {
  thread_local Tiles t{};
  return t;
}
inline void loadconfig(const void* config) {
  const auto* c = static_cast<const uint8_t*>(config);
  for (int t = 0; t < 8; ++t) {
    tiles().colsb[t] = c[16 + 2 * t] | c[17 + 2 * t] << 8;
    tiles().rows[t] = c[48 + t];
  }
}
inline void zero(int t) { std::memset(tiles().data[t], 0, sizeof tiles().data[t]); }
inline void loadd(int t, const void* base, long stride) {
  for (int r = 0; r < tiles().rows[t]; ++r)
    std::memcpy(tiles().data[t][r], static_cast<const char*>(base) + r * stride, size_t(tiles().colsb[t]));
}
inline void stored(int t, void* base, long stride) {
  for (int r = 0; r < tiles().rows[t]; ++r)
    std::memcpy(static_cast<char*>(base) + r * stride, tiles().data[t][r], size_t(tiles().colsb[t]));
}
inline float bf16_at(const uint8_t* p) {
  const uint32_t u = uint32_t(p[0] | p[1] << 8) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline void dpbf16ps(int c, int a, int b) {
  Tiles& s = tiles();
  for (int m = 0; m < s.rows[c]; ++m)
    for (int n = 0; n < s.colsb[c] / 4; ++n) {
      float acc;
      std::memcpy(&acc, &s.data[c][m][4 * n], sizeof acc);
      for (int k = 0; k < s.colsb[a] / 4; ++k) {
        acc += bf16_at(&s.data[a][m][4 * k]) * bf16_at(&s.data[b][k][4 * n]);
        acc += bf16_at(&s.data[a][m][4 * k + 2]) * bf16_at(&s.data[b][k][4 * n + 2]);
      }
      std::memcpy(&s.data[c][m][4 * n], &acc, sizeof acc);
    }
}
}  // namespace isa_emulation
#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_release
#undef _tile_dpbf16ps
#define _tile_loadconfig(config) isa_emulation::loadconfig(config)
#define _tile_release() ((void)0)
#define _tile_zero(t) isa_emulation::zero(t)
#define _tile_loadd(t, base, stride) isa_emulation::loadd(t, base, stride)
#define _tile_stored(t, base, stride) isa_emulation::stored(t, base, stride)
#define _tile_dpbf16ps(c, a, b) isa_emulation::dpbf16ps(c, a, b)
#define __AMX_TILE__ 1
#define __AMX_BF16__ 1
#endif
