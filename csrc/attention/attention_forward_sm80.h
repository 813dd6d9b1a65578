// Internal: the per-head-dim instantiations of the sm80 forward (one .cu file each, so they compile in
// parallel), dispatched by forward_cuda.
#pragma once
#include <cuda_runtime_api.h>

namespace cm3leon::attention::cuda {

struct AttnParams;

template <typename Element, int kHeadDim>
cudaError_t run_forward_sm80(const AttnParams& p, cudaStream_t stream);

}  // namespace cm3leon::attention::cuda
