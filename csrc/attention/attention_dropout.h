// Attention dropout's keep mask (torch-free, header-only). One function, dropout_row, decides which elements
// are kept: the forward and backward kernels call it to drop probabilities and the mask op
// (flash_attn_dropout_mask) calls it to show the same mask to tests and to S_dmask.
//
// Element (segment b, query head h, query i, key j) is kept iff the uniform u = word * 2^-32 >= p, where word is
// lane j % 4 of Philox4x32-10 under key = the 64-bit seed at counter (j / 4, i, b * heads_q + h, kStreamTag):
// a pure function of (seed, b, h, i, j, p), so it does not depend on tiling, threads or call order, and the
// backward regenerates the forward's mask. i and j count from the segment's (batch row's or document's)
// first query and key.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/philox.h"

namespace cm3leon::attention {

struct DropoutStream {
  uint64_t seed = 0;
  uint64_t threshold = 0;  // keep iff word >= threshold; 0 keeps everything (p == 0)
};

// ceil(p * 2^32) for p in [0, 1): word * 2^-32 >= p  <=>  word >= ceil(p * 2^32) (exact in double).
inline uint64_t dropout_threshold(double p) { return uint64_t(std::ceil(std::ldexp(p, 32))); }

CM3LEON_ISA_BEGIN

// Word 3 of every dropout counter: the sampling streams (philox.h) put a step's high half there, so they would
// need step >= 2^63 to meet a dropout counter.
constexpr uint32_t kStreamTag = 0xE4726F70u;  // "drop" in ASCII with the top bit set

// Calls emit(j, kept) for keys j in [j0, j1) of query i of stream b * heads_q + h.
template <typename Emit>
inline void dropout_row(const DropoutStream& ds, uint32_t stream, uint32_t i, int64_t j0, int64_t j1, Emit&& emit) {
  for (int64_t j4 = j0 & ~int64_t(3); j4 < j1; j4 += 4) {
    const Philox4x32 w = philox4x32_10(Philox4x32{{uint32_t(j4 >> 2), i, stream, kStreamTag}}, uint32_t(ds.seed),
                                       uint32_t(ds.seed >> 32));
    for (int64_t lane = 0; lane < 4; ++lane) {
      const int64_t j = j4 + lane;
      if (j >= j0 && j < j1) emit(j, uint64_t(w.v[lane]) >= ds.threshold);
    }
  }
}

CM3LEON_ISA_END
}  // namespace cm3leon::attention
