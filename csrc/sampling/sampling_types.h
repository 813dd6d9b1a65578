// Torch-free descriptions of a sampling call shared by the CPU and CUDA kernels and their launchers.
#pragma once
#include <cstdint>

namespace cm3leon::sampling {

// What a row can be wrong with; the launcher turns the first bad row into an exception.
enum class RowStatus : int32_t {
  Ok = 0,
  NonFinite = 1,   // a NaN or +inf logit (or a stream mix that overflowed to +-inf / NaN)
  EmptyRow = 2,    // every token of the row is excluded (allowed_range/allowed_mask/-inf logits)
  OutOfMemory = 3, // the row workspace could not be allocated
};

struct RowError {
  int64_t row;       // -1 when every row is fine
  RowStatus status;
};

// Where each row's randomness comes from: Philox key seed (per row or shared) and counter (row, step).
struct SeedSpec {
  const int64_t* per_row;  // [B] per-row seeds (counter row field 0), or null: `shared` with row field = r
  int64_t shared;
  uint64_t step;
};

// The allowed vocabulary: [range_lo, range_hi) intersected with mask (if given).
struct Vocab {
  int64_t range_lo, range_hi;
  const bool* mask;          // null, or [V] (mask_row_stride 0) / [B, V] (mask_row_stride V)
  int64_t mask_row_stride;
};

struct CfgOptions {
  int64_t streams;       // S = 1, 2 or 3
  float scale0, scale1;  // S = 2: scale0 = s; S = 3: (s_img, s_txt)
  float temperature;     // 0 = greedy
  int64_t top_k;         // 0 = off
  double top_p;          // 1 = off
  double min_p;          // 0 = off
};

struct ContrastiveOptions {
  double alpha;               // head set: p_exp(x) >= alpha * (k-th largest p_exp)
  int64_t k;
  float temperature;          // sampling temperature on the scores; 0 = argmax of the scores
  float amateur_temperature;  // p_ama = softmax(amateur / amateur_temperature)
};

}  // namespace cm3leon::sampling
