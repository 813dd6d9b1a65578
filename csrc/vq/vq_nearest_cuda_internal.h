// Pieces shared by the CUDA nearest-code translation units (torch-free; host and device).
//
// The search runs in three steps (see docs/vq.md, "CUDA"): per-code statistics; a tensor-core GEMM of z . c^T
// whose epilogue keeps, per row and code split, the kKeep best approximate scores plus the lowest score it
// dropped; and a finaliser that merges the splits and re-checks the candidates exactly in double.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

namespace cm3leon::vq::nearest_gpu {

constexpr int kTileRows = 128;   // rows of z per GEMM block
constexpr int kTileCodes = 128;  // codes per GEMM tile
constexpr int kKeep = 8;         // approximate candidates kept per row (and per code split)

// Approximate score of a code: bias + weight * (z . c). It ranks codes like the exact distance:
// L2: ||c||^2 - 2 z.c (= ||z - c||^2 - ||z||^2); cosine: -2 z.c / ||c|| (= 2 ||z|| (cos distance - 1)).
struct CodeStats {
  float bias;
  float weight;
};

// Maxima over the codebook that bound the GEMM's rounding error (written with atomicMax on the bit
// patterns of non-negative floats, so the buffer starts zeroed).
// A finite code whose statistics overflow sets its maxima to +inf, which sends every row to the exact scan.
struct CodebookBounds {
  float abs_bias;           // max |bias|
  float weight_times_norm;  // max |weight| * ||c||
  float norm;               // max ||c||
  float weight;             // max |weight|
};

// A row's best approximate candidates (ascending score; empty slots have index -1 and score +inf) and the
// lowest approximate score of any code that is not among them (+inf when none was dropped).
struct Candidates {
  float score[kKeep];
  int32_t index[kKeep];
  float dropped;
};

struct GemmParams {
  const void* z;         // [n, d_pad], rows 16-byte aligned
  const void* codebook;  // [k, d_pad], rows 16-byte aligned
  int64_t n;
  int32_t k;
  int32_t d_pad;
  int32_t tiles_per_split;  // code tiles handled by one block (gridDim.y = code splits)
  const CodeStats* stats;   // [k]
  Candidates* out;          // [splits, n]
};

// One launch of the GEMM kernel for a storage type (one translation unit each, so they compile in parallel).
cudaError_t launch_gemm_bf16(const GemmParams& p, int row_tiles, int splits, cudaStream_t stream);
cudaError_t launch_gemm_fp16(const GemmParams& p, int row_tiles, int splits, cudaStream_t stream);
cudaError_t launch_gemm_fp32(const GemmParams& p, int row_tiles, int splits, cudaStream_t stream);

// Keeps the kKeep lowest (score, index) pairs of `c`; whatever falls out lowers `c.dropped`. NaN and +inf
// scores are ignored: such a code can never be the nearest one (its exact distance is not finite either).
__host__ __device__ inline void offer(Candidates& c, float score, int32_t index) {
  if (!(score < __builtin_huge_valf())) return;
  constexpr int last = kKeep - 1;
  const bool better = c.index[last] < 0 || score < c.score[last] ||
                      (score == c.score[last] && index < c.index[last]);
  if (!better) {
    c.dropped = score < c.dropped ? score : c.dropped;
    return;
  }
  if (c.index[last] >= 0 && c.score[last] < c.dropped) c.dropped = c.score[last];
  int pos = last;
  while (pos > 0 && (c.index[pos - 1] < 0 || score < c.score[pos - 1] ||
                     (score == c.score[pos - 1] && index < c.index[pos - 1]))) {
    c.score[pos] = c.score[pos - 1];
    c.index[pos] = c.index[pos - 1];
    --pos;
  }
  c.score[pos] = score;
  c.index[pos] = index;
}

__host__ __device__ inline Candidates empty_candidates() {
  Candidates c;
  for (int j = 0; j < kKeep; ++j) {
    c.score[j] = __builtin_huge_valf();
    c.index[j] = -1;
  }
  c.dropped = __builtin_huge_valf();
  return c;
}

}  // namespace cm3leon::vq::nearest_gpu
