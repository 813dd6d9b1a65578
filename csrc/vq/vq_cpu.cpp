// Fused VQ nearest-code search: a register-blocked GEMM (z . c^T) whose epilogue keeps the running argmin.
//
// Layout (GotoBLAS-style): the codebook is packed once into panels of NR codes, d-major ([d][NR] fp32),
// with ||c||^2 precomputed. Each work item takes a block of MC rows of z, packs them into panels of MR=6
// rows ([d][6] fp32), and for every code panel runs the micro-kernel over all z panels (the code panel
// stays in L1, the z block in L2). Scores cnorm - 2 z.c are reduced straight into a per-row best, so memory
// is O(n + k*d) and the n x k matrix never exists. bf16/fp16 are widened while packing; all math is fp32.
#include "vq/vq_cpu.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/amx.h"
#include "common/micro_kernel.h"
#include "common/parallel.h"
#include "common/scratch.h"

namespace cm3leon::vq {
CM3LEON_ISA_BEGIN
namespace {

constexpr int64_t MR = kMicroRows;  // z rows per micro-kernel
constexpr int64_t NR = kMicroCols;  // codes per micro-kernel
constexpr int64_t MC = 96;   // z rows per work item (16 panels of 6; ~96 KiB packed at d=256)
constexpr int64_t KC = 256;  // depth chunk: a code panel chunk (16 KiB) must stay in L1

// In double: the squared norm of a finite fp32 vector can overflow (or underflow) fp32, never double.
template <typename T>
double row_norm(const T* x, int64_t d) {
  double s = 0.0;
  for (int64_t i = 0; i < d; ++i) { const double v = to_float(x[i]); s += v * v; }
  return std::sqrt(s);
}

// Cosine scores compare z.c over codes, so a positive per-row factor of z changes no argmin: scaling by the
// power of two that brings max|z| into [0.5, 1) is exact and keeps z.c (codes are unit vectors) far from
// fp32 overflow. Returns that power's exponent (applied with ldexp: 2^exponent itself may not be a float).
template <typename T>
int cosine_row_shift(const T* x, int64_t d) {
  float top = 0.f;
  for (int64_t i = 0; i < d; ++i) top = std::max(top, std::fabs(to_float(x[i])));
  if (!(top > 0.f) || !std::isfinite(top)) return 0;  // zero rows, and NaN/inf that must stay visible
  int exponent = 0;
  std::frexp(top, &exponent);
  return -exponent;
}

// The packed codebook: panels of NR codes, d-major, plus the per-code bias added to -2 z.c. On levels with
// the bf16 dot-product instruction, bf16 codebooks searched by L2 (whose codes are used as given, so they
// stay exact in bf16) are packed as bf16 pairs instead and scanned with micro_tile's pair overload.
struct PackedCodebook {
  int64_t panels;
  ScratchBuffer<float> values;    // [panels][d][NR] (fp32 path)
  ScratchBuffer<uint32_t> pairs;  // [panels][ceil(d / 2)][NR] (bf16 path)
  ScratchBuffer<float> bias;      // [panels * NR]: ||c||^2 (L2), 0 (cosine, codes pre-normalised), +inf padding
};

// Pair rows of a packed bf16 code panel: ceil(d / 2), padded with zero pairs to whole 16-pair AMX tiles.
inline int64_t pair_rows(int64_t d) { return kAmx ? ceil_div(d, 32) * 16 : ceil_div(d, 2); }

template <typename T>
bool bf16_dot_path(Metric metric) {
  return (kHasBf16Dot || kAmx) && std::is_same_v<T, bf16> && metric == Metric::L2;
}

template <typename T>
PackedCodebook pack_codebook(const T* codebook, int64_t k, int64_t d, Metric metric, int threads) {
  const int64_t panels = ceil_div(k, NR), d2 = pair_rows(d);
  const bool pairs = bf16_dot_path<T>(metric);
  PackedCodebook packed{panels, ScratchBuffer<float>(pairs ? 0 : size_t(panels * d * NR)),
                        ScratchBuffer<uint32_t>(pairs ? size_t(panels * d2 * NR) : 0),
                        ScratchBuffer<float>(size_t(panels * NR))};
  parallel_items(threads, packed.panels, [&](int64_t panel) {
    float* dst = pairs ? nullptr : packed.values.data() + panel * d * NR;
    uint32_t* dst2 = pairs ? packed.pairs.data() + panel * d2 * NR : nullptr;
    for (int64_t j = 0; j < NR; ++j) {
      const int64_t code = panel * NR + j;
      if (code >= k) {  // padding codes of the last panel: zero values, never the argmin
        if (pairs) for (int64_t p = 0; p < d2; ++p) dst2[p * NR + j] = 0u;
        else for (int64_t p = 0; p < d; ++p) dst[p * NR + j] = 0.f;
        packed.bias[size_t(code)] = std::numeric_limits<float>::infinity();
        continue;
      }
      const T* src = codebook + code * d;
      if constexpr (std::is_same_v<T, bf16>) {
        if (pairs) {
          float sq = 0.f;
          for (int64_t p = 0; p < d; ++p) sq += to_float(src[p]) * to_float(src[p]);
          for (int64_t p = 0; p < d2; ++p) dst2[p * NR + j] = bf16_pair(src, 2 * p, d);
          packed.bias[size_t(code)] = sq;
          continue;
        }
      }
      double scale = 1.0;
      float sq = 0.f;
      if (metric == Metric::Cosine) {
        const double norm = row_norm(src, d);
        scale = norm > 0.0 ? 1.0 / norm : 0.0;
      }
      for (int64_t p = 0; p < d; ++p) {
        const float v = float(double(to_float(src[p])) * scale);
        dst[p * NR + j] = v;
        sq += v * v;
      }
      packed.bias[size_t(code)] = metric == Metric::L2 ? sq : 0.f;
    }
  });
  return packed;
}

// Packs rows [row0, row0 + rows) of z into MR-row panels; missing rows of the last panel are zero. Cosine
// rows are rescaled by cosine_row_shift.
template <typename T>
void pack_rows(const T* z, int64_t row0, int64_t rows, int64_t d, Metric metric, float* dst) {
  for (int64_t panel = 0; panel < ceil_div(rows, MR); ++panel) {
    float* out = dst + panel * d * MR;
    for (int64_t r = 0; r < MR; ++r) {
      const int64_t row = panel * MR + r;
      if (row < rows) {
        const T* src = z + (row0 + row) * d;
        if (metric == Metric::Cosine) {
          const int shift = cosine_row_shift(src, d);
          for (int64_t p = 0; p < d; ++p) out[p * MR + r] = std::ldexp(to_float(src[p]), shift);
        } else {
          for (int64_t p = 0; p < d; ++p) out[p * MR + r] = to_float(src[p]);
        }
      } else {
        for (int64_t p = 0; p < d; ++p) out[p * MR + r] = 0.f;
      }
    }
  }
}

// z rows [row0, row0 + rows) as bf16 pairs for the bf16 dot-product path (L2 only): row-major, [rows rounded
// up to 32][d2], for AMX tiles (the A operand); else panels of MR rows, [d2][MR] per panel, for micro_tile (pairs).
template <typename T>
void pack_z_pairs(const T* z, int64_t row0, int64_t rows, int64_t d, int64_t d2, bool amx, uint32_t* dst) {
  if constexpr (std::is_same_v<T, bf16>) {
    if (amx) pack_pair_rows(z + row0 * d, d, rows, d, ceil_div(rows, 32) * 32, 2 * d2, dst);
    else pack_pair_panels(z + row0 * d, d, rows, d, MR, ceil_div(rows, MR) * MR, 2 * d2, dst);
  }
}

// tile[r][j] = z_r . c_j for the rows (a multiple of 32) of a packed z block and one NR = 32 code panel.
inline void amx_panel(const uint32_t* zp, int64_t rows, int64_t d2, const uint32_t* cpanel, float* tile) {
  static_assert(!kAmx || NR == 32, "one 32-column AMX block per panel");
  for (int64_t r0 = 0; r0 < rows; r0 += 32) amx_block(zp + r0 * d2, d2, cpanel, NR, d2, tile + r0 * NR, NR, false);
}

struct Best {
  float score;
  int64_t index;
};

// Scans code panels [panel0, panel1) for rows [row0, row0 + rows) and writes each row's best score.
template <typename T>
void scan_block(const T* z, const PackedCodebook& codes, int64_t row0, int64_t rows, int64_t d, Metric metric,
                int64_t panel0, int64_t panel1, Best* best) {
  const int64_t z_panels = ceil_div(rows, MR), d2 = pair_rows(d);
  const bool pairs = codes.pairs.size() > 0;
  const bool amx = kAmx && pairs;
  std::vector<float> zpack(pairs ? 0 : size_t(z_panels * MR * d));
  std::vector<uint32_t> zpairs(pairs ? size_t((amx ? ceil_div(rows, 32) * 32 : z_panels * MR) * d2) : 0);
  std::vector<float> tile(size_t((amx ? ceil_div(rows, 32) * 32 : z_panels * MR) * NR));
  if (pairs) pack_z_pairs(z, row0, rows, d, d2, amx, zpairs.data());
  else pack_rows(z, row0, rows, d, metric, zpack.data());
  for (int64_t r = 0; r < rows; ++r) best[r] = {std::numeric_limits<float>::infinity(), -1};
  [[maybe_unused]] const AmxSession session(amx);

  for (int64_t panel = panel0; panel < panel1; ++panel) {
    if (amx) {
      amx_panel(zpairs.data(), ceil_div(rows, 32) * 32, d2, codes.pairs.data() + panel * d2 * NR, tile.data());
    } else if (pairs) {
      [[maybe_unused]] const uint32_t* cpanel = codes.pairs.data() + panel * d2 * NR;
      for (int64_t p0 = 0; p0 < d2; p0 += KC / 2) {
        [[maybe_unused]] const int64_t depth = std::min(KC / 2, d2 - p0);
        for (int64_t zp = 0; zp < z_panels; ++zp) {
#if defined(__AVX512BF16__) && defined(__AVX512F__)
          micro_tile(zpairs.data() + zp * d2 * MR + p0 * MR, MR, 1, cpanel + p0 * NR, NR, depth,
                          tile.data() + zp * MR * NR, NR, p0 > 0);
#endif
        }
      }
    } else {
      const float* cpanel = codes.values.data() + panel * d * NR;
      for (int64_t p0 = 0; p0 < d; p0 += KC) {
        const int64_t depth = std::min(KC, d - p0);
        for (int64_t zp = 0; zp < z_panels; ++zp)
          micro_tile(zpack.data() + zp * d * MR + p0 * MR, MR, 1, cpanel + p0 * NR, NR, depth,
                     tile.data() + zp * MR * NR, NR, p0 > 0);
      }
    }
    const float* bias = codes.bias.data() + panel * NR;
    for (int64_t r = 0; r < rows; ++r) {
      const float* dots = tile.data() + r * NR;
      Best b = best[r];
      for (int64_t j = 0; j < NR; ++j) {
        const float score = bias[j] - 2.f * dots[j];
        if (score < b.score) b = {score, panel * NR + j};  // strict: ties keep the lower index
      }
      best[r] = b;
    }
  }
}

// When the fp32 expanded form can be wrong beyond rounding, an L2 row is searched again exactly:
// - ||z|| >= 2^62 or a winner at distance >= 2^120: ||c||^2 or 2 z.c can overflow fp32, so a finite distance may
//   score inf (or a far code -inf). Below both limits any code nearer than the winner has ||c|| < 2^63, whose
//   score cannot overflow.
// - a tiny row (||z||^2 < 2^-100) whose winner is at a distance in (0, 2^-100): the products underflow into fp32
//   subnormals. A winner at distance 0 is exact (an equal code with a lower index would score the same).
constexpr double kL2NormLimit = 0x1p62, kL2FarLimit = 0x1p120, kL2TinyLimit = 0x1p-100;

// Such rows are searched exactly: every code's distance in double (no fp32 intermediate), lowest index on ties,
// codes with NaN/inf entries skipped. Returns index -1 when no code has a finite distance.
template <typename T>
std::pair<int64_t, double> exact_l2_scan(const T* zr, const T* codebook, int64_t k, int64_t d) {
  std::pair<int64_t, double> best{-1, std::numeric_limits<double>::infinity()};
  for (int64_t code = 0; code < k; ++code) {
    const T* cr = codebook + code * d;
    double acc = 0.0;
    for (int64_t p = 0; p < d; ++p) {
      const double diff = double(to_float(zr[p])) - double(to_float(cr[p]));
      acc += diff * diff;
    }
    if (acc < best.second) best = {code, acc};  // strict: NaN never wins, ties keep the lower index
  }
  return best;
}

template <typename T>
int64_t nearest(const T* z, const T* codebook, int64_t n, int64_t k, int64_t d, Metric metric,
                int64_t* indices, float* distance, int threads) {
  if (n == 0) return 0;
  const PackedCodebook codes = pack_codebook(codebook, k, d, metric, threads);

  // Work items: row blocks x code ranges. Few rows (decode-sized calls) split the codebook instead so
  // every core has work; the partial winners are merged in code order, which preserves lowest-index ties.
  const int64_t row_blocks = ceil_div(n, MC);
  const int64_t want = 4 * int64_t(usable_threads(threads));
  const int64_t code_splits = row_blocks >= want ? 1 : std::min(codes.panels, ceil_div(want, row_blocks));
  const int64_t panels_per_split = ceil_div(codes.panels, code_splits);
  std::vector<Best> partial(size_t(code_splits * n));
  parallel_items(threads, row_blocks * code_splits, [&](int64_t item) {
    const int64_t block = item / code_splits, split = item % code_splits;
    const int64_t row0 = block * MC, rows = std::min(MC, n - row0);
    const int64_t panel0 = split * panels_per_split;
    const int64_t panel1 = std::min(codes.panels, panel0 + panels_per_split);
    scan_block(z, codes, row0, rows, d, metric, panel0, panel1, partial.data() + split * n + row0);
  });

  int64_t non_finite = 0;
#pragma omp parallel for reduction(+ : non_finite) num_threads(usable_threads(threads)) if (n * d > 65536)
  for (int64_t row = 0; row < n; ++row) {
    Best b = partial[size_t(row)];
    for (int64_t s = 1; s < code_splits; ++s) {
      const Best& other = partial[size_t(s * n + row)];
      if (other.score < b.score) b = other;
    }
    const T* zr = z + row * d;
    double acc = 0.0, zz = 0.0, cc = 0.0;
    if (b.index >= 0) {
      // Recompute the winner's distance directly (the expanded form cancels badly when z is close to c), in
      // double: one O(d) pass per row, and the result is then correctly rounded to fp32 in practice.
      const T* cr = codebook + b.index * d;
      for (int64_t p = 0; p < d; ++p) {
        const double zv = to_float(zr[p]), cv = to_float(cr[p]);
        if (metric == Metric::L2) {
          acc += (zv - cv) * (zv - cv); zz += zv * zv;
        } else {
          acc += zv * cv; zz += zv * zv; cc += cv * cv;
        }
      }
    }
    if (metric == Metric::L2 && (b.index < 0 || !(zz < kL2NormLimit * kL2NormLimit) || !(acc < kL2FarLimit)
                                 || (acc > 0.0 && acc < kL2TinyLimit && zz < kL2TinyLimit))) {
      const auto [index, exact] = exact_l2_scan(zr, codebook, k, d);
      b.index = index;
      acc = exact;
    }
    if (b.index < 0) {  // every score was NaN or +inf
      ++non_finite;
      indices[row] = 0;
      distance[row] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    const float dist = float(metric == Metric::L2 ? acc
                             : (zz > 0.0 && cc > 0.0) ? 1.0 - acc / (std::sqrt(zz) * std::sqrt(cc)) : 1.0);
    if (!std::isfinite(dist)) {  // an inf in z scores -inf against some codes, but no distance is finite
      ++non_finite;
      indices[row] = 0;
      distance[row] = std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    indices[row] = b.index;
    distance[row] = dist;
  }
  return non_finite;
}

}  // namespace
CM3LEON_ISA_END

template <>
int64_t nearest_kernel<kIsa>(DType dtype, const void* z, const void* codebook, int64_t n, int64_t k, int64_t d,
                             Metric metric, int64_t* indices, float* distance, int threads) {
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    return nearest(static_cast<const T*>(z), static_cast<const T*>(codebook), n, k, d, metric, indices,
                   distance, threads);
  });
}

template <>
int64_t embed_kernel<kIsa>(DType dtype, const int64_t* indices, const void* codebook, int64_t n, int64_t k,
                           int64_t d, void* out, int threads) {
  return dispatch_float(dtype, [&](auto tag) -> int64_t {
    using T = decltype(tag);
    const T* src = static_cast<const T*>(codebook);
    T* dst = static_cast<T*>(out);
    for (int64_t i = 0; i < n; ++i)
      if (indices[i] < 0 || indices[i] >= k) return i;
    parallel_items(threads, ceil_div(n, 256), [&](int64_t block) {
      for (int64_t i = block * 256; i < std::min(n, block * 256 + 256); ++i)
        std::copy(src + indices[i] * d, src + (indices[i] + 1) * d, dst + i * d);
    });
    return -1;
  });
}

}  // namespace cm3leon::vq
