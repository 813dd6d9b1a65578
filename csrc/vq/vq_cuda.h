// Torch-free CUDA entry points of the VQ kernels (host functions taking raw pointers and a stream).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>
#include "common/dtype.h"
#include "vq/vq_cpu.h"

namespace cm3leon::vq {

// out[i, :] = codebook[indices[i], :]. Indices outside [0, k) produce zero rows and lower *bad_index (a device
// value the caller initialises to LLONG_MAX) to the smallest such position, checked without a host sync.
cudaError_t embed_cuda(DType dtype, const int64_t* indices, const void* codebook, int64_t n, int64_t k,
                       int64_t d, void* out, long long* bad_index, cudaStream_t stream);

// The nearest-code search (docs/vq.md, "CUDA"). Plan first, allocate plan.workspace_bytes of device memory
// (256-byte aligned), then run; the plan depends only on the arguments and the current device's SM count.
struct NearestPlan {
  int64_t n, k, d, d_pad;
  int row_tiles, splits, tiles_per_split;
  bool pad_z, pad_codebook;  // rows copied into the workspace, zero-padded to d_pad / 16-byte aligned
  size_t stats_offset, partials_offset, z_offset, codebook_offset, workspace_bytes;
};

cudaError_t plan_nearest_cuda(DType dtype, const void* z, const void* codebook, int64_t n, int64_t k, int64_t d,
                              NearestPlan* plan);

// Writes indices[n] (int64) and distance[n] (float32) for z [n, d] and codebook [k, d] (row-major, device
// memory; n > 0, 0 < k < 2^31). Afterwards the workspace's first 8 bytes hold (as uint64) the number of rows
// whose distances were all NaN/inf (their outputs are index 0 and NaN).
cudaError_t nearest_cuda(const NearestPlan& plan, DType dtype, const void* z, const void* codebook, Metric metric,
                         void* workspace, int64_t* indices, float* distance, cudaStream_t stream);

}  // namespace cm3leon::vq
