// The backward's main kernels, one declaration per path (internal to attention_backward_*.cu).
#pragma once
#include <cuda_runtime_api.h>

#include "attention/attention_backward_cuda.h"

namespace cm3leon::attention::bwd {

// bf16 / fp16 tensor-core path for head dims up to kHeadDim (64, 128, 256); instantiated one bucket per
// translation unit (attention_backward_sm80_hdim*.cu) so they compile in parallel.
template <int kHeadDim>
cudaError_t backward_sm80(const BackwardParams& p, cudaStream_t stream);

// float32 path: plain fp32 FMAs (correct, slow; tensor cores would need TF32, which loses precision).
cudaError_t backward_simt(const BackwardParams& p, cudaStream_t stream);

}  // namespace cm3leon::attention::bwd
