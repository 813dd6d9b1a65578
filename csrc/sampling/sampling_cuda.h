// Torch-free CUDA entry points of the samplers (host functions taking raw pointers and a stream). Same
// semantics as sampling_cpu.h; one thread block per row, no host synchronisation, no allocation.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "common/dtype.h"
#include "sampling/sampling_types.h"

namespace cm3leon::sampling {

// Where each row's randomness comes from, readable on the device: as SeedSpec, except that the step may
// live in device memory (`step_ptr`, one int64; null: use `step`), so a captured CUDA graph advances it.
struct DeviceSeeds {
  const int64_t* per_row;  // device [B], or null
  int64_t shared;
  uint64_t step;
  const int64_t* step_ptr;  // device, or null
};

// Row errors go to `status`, one device int64 the caller initialises to INT64_MAX: each bad row r lowers it
// (atomicMin) to r * kStatusRows + RowStatus, so it ends as the first bad row and its status. Bad rows get
// token -1 and logprob NaN.
constexpr int64_t kStatusRows = 4;

// log_min_p = log(min_p) computed by the caller in double (unused when min_p == 0), as the CPU kernel does.
cudaError_t cfg_sample_cuda(DType dtype, const void* logits, int64_t batch, int64_t row_stride,
                            int64_t stream_stride, const CfgOptions& options, double log_min_p,
                            const Vocab& allowed, const DeviceSeeds& seeds, int64_t* tokens, float* logprobs,
                            long long* status, cudaStream_t stream);

// log_alpha = log(alpha) in double (unused when alpha == 0).
cudaError_t contrastive_sample_cuda(DType dtype, const void* expert, const void* amateur, int64_t batch,
                                    int64_t expert_row_stride, int64_t amateur_row_stride,
                                    const ContrastiveOptions& options, double log_alpha, const Vocab& allowed,
                                    const DeviceSeeds& seeds, int64_t* tokens, float* logprobs,
                                    long long* status, cudaStream_t stream);

}  // namespace cm3leon::sampling
