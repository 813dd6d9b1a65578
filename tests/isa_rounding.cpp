// Test-only: the bf16 rounding helpers the kernels use for their pair operands (round_pairs,
// round_neighbour_pairs, round_row_pairs, round_col_pairs), as compiled at one instruction-set level, against
// the scalar bf16_pair bit for bit, on values chosen to stress rounding: ties to even and odd, neighbours of
// ties, subnormals, signed zeros, infinities, NaNs with payloads and the largest finite values (which round to
// infinity). Outputs start poisoned, so a word the helper leaves unwritten counts as a mismatch. Compiled per
// level beside the kernel sources by tests/test_isa_oracle.py and called from tests/isa_oracle.cpp.
#include "common/isa.h"
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "common/micro_kernel.h"

namespace cm3leon {

template <Isa I>
int64_t bf16_rounding_mismatches(uint64_t seed, int64_t& checked);

namespace {

constexpr uint32_t kPoison = 0xdeadbeefu;

float stress_value(std::mt19937_64& rng) {
  static const uint32_t specials[] = {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u,
                                      0xffc00001u, 0x7f800001u, 0x7fbfffffu, 0x7f7fffffu, 0xff7fffffu,
                                      0x7f7f8000u, 0x00000001u, 0x807fffffu, 0x00008000u, 0x3f808000u,
                                      0x3f818000u, 0x3f807fffu, 0x3f808001u};
  const uint32_t r = uint32_t(rng());
  uint32_t bits;
  switch (rng() % 6) {
    case 0: bits = specials[rng() % (sizeof specials / sizeof specials[0])]; break;
    case 1: bits = (r & 0xffff0000u) | 0x8000u; break;                        // exact ties
    case 2: bits = (r & 0xffff0000u) | (rng() % 2 ? 0x7fffu : 0x8001u); break;  // next to ties
    case 3: bits = r & 0x807fffffu; break;                                     // subnormals and zeros
    default: bits = r; break;                                                  // any bit pattern
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

}  // namespace

template <>
int64_t bf16_rounding_mismatches<kIsa>(uint64_t seed, int64_t& checked) {
  std::mt19937_64 rng(seed);
  int64_t bad = 0;
  checked = 0;
  auto expect = [&](uint32_t got, float lo, float hi) {
    ++checked;
    bad += got != bf16_pair(lo, hi);
  };
  for (int trial = 0; trial < 40; ++trial) {
    // Tile sizes around the vector widths (16 lanes, 32 values per neighbour step, 16 x 16 transposes).
    const int64_t rows = 1 + int64_t(rng() % 70), cols = 1 + int64_t(rng() % 70), ld = cols + int64_t(rng() % 5);
    std::vector<float> src(size_t(rows * ld + 1));
    for (float& x : src) x = stress_value(rng);

    std::vector<uint32_t> out(size_t(cols), kPoison);
    round_pairs(src.data(), src.data() + ld * (rows / 2), cols, out.data());
    for (int64_t j = 0; j < cols; ++j) expect(out[size_t(j)], src[size_t(j)], src[size_t(ld * (rows / 2) + j)]);

    const int64_t n = 2 * (rows * ld / 2);
    out.assign(size_t(n / 2), kPoison);
    round_neighbour_pairs(src.data(), n, out.data());
    for (int64_t j = 0; j < n / 2; ++j) expect(out[size_t(j)], src[size_t(2 * j)], src[size_t(2 * j + 1)]);

    out.assign(size_t(rows / 2 * ld), kPoison);
    round_row_pairs(src.data(), ld, rows, cols, out.data());
    for (int64_t i = 0; i < rows / 2; ++i)
      for (int64_t c = 0; c < cols; ++c)
        expect(out[size_t(i * ld + c)], src[size_t(2 * i * ld + c)], src[size_t((2 * i + 1) * ld + c)]);

    // Rows past `rows` count as zeros; rows_pad a multiple of 32 takes the transposing path.
    const int64_t rows_pad = rng() % 2 ? (rows + 31) / 32 * 32 : (rows + 1) / 2 * 2, ldd = rows_pad / 2 + 3;
    out.assign(size_t(cols * ldd), kPoison);
    round_col_pairs(src.data(), ld, rows, rows_pad, cols, out.data(), ldd);
    for (int64_t c = 0; c < cols; ++c)
      for (int64_t i = 0; i < rows_pad / 2; ++i)
        expect(out[size_t(c * ldd + i)], 2 * i < rows ? src[size_t(2 * i * ld + c)] : 0.f,
               2 * i + 1 < rows ? src[size_t((2 * i + 1) * ld + c)] : 0.f);
  }
  return bad;
}

}  // namespace cm3leon
