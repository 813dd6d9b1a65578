// Rotary position embedding of one token's heads, for the KV-cache op (torch-free, host code: the work is
// O(new tokens * heads * head_dim), negligible next to the attention that follows).
#pragma once
#include <algorithm>
#include <cstdint>

#include "common/half.h"

namespace cm3leon::attention {
CM3LEON_ISA_BEGIN

// dst[h][:] = src[h][:] with features [0, rotary_dim) of every head rotated by the angles of one position:
// cos/sin hold rotary_dim / 2 values. Pair i is features (2i, 2i + 1) when interleaved (GPT-J), else
// (i, i + rotary_dim / 2) (GPT-NeoX); (x, y) becomes (x cos - y sin, x sin + y cos), computed in fp32 and
// rounded once. Features past rotary_dim are copied. dst may alias src.
template <typename T>
void rotary_token(const T* src, T* dst, int64_t heads, int64_t head_dim, int64_t rotary_dim, const T* cos,
                  const T* sin, bool interleaved) {
  const int64_t half = rotary_dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const T* x = src + h * head_dim;
    T* y = dst + h * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const int64_t a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
      const float c = to_float(cos[i]), s = to_float(sin[i]), xa = to_float(x[a]), xb = to_float(x[b]);
      from_float(xa * c - xb * s, y + a);
      from_float(xa * s + xb * c, y + b);
    }
    if (y != x) std::copy(x + rotary_dim, x + head_dim, y + rotary_dim);
  }
}

CM3LEON_ISA_END
}  // namespace cm3leon::attention
