// Torch-free CUDA entry points of the VQ kernels (host functions taking raw pointers and a stream).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>
#include "common/dtype.h"

namespace cm3leon::vq {

// out[i, :] = codebook[indices[i], :]. Indices outside [0, k) produce zero rows and lower *bad_index (a device
// value the caller initialises to LLONG_MAX) to the smallest such position, checked without a host sync.
cudaError_t embed_cuda(DType dtype, const int64_t* indices, const void* codebook, int64_t n, int64_t k,
                       int64_t d, void* out, long long* bad_index, cudaStream_t stream);

}  // namespace cm3leon::vq
