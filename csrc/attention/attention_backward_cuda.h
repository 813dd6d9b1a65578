// Torch-free CUDA entry point of the attention backward (host function taking raw pointers and a stream).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>
#include "attention/attention_cuda_params.cuh"

namespace cm3leon::attention {

// One backward problem: cuda::BackwardParams (attention_cuda_params.cuh), dense or packed (cu_seqlens given;
// the kernels trust them to be valid, checked by the forward, and clamp them so bad values cannot fault).
using cuda::BackwardParams;

// dq, dk, dv of the attention forward (probabilities recomputed from lse). dk/dv of a kv head are summed over
// the query heads that share it (GQA). Returns the first CUDA error (e.g. not enough shared memory for
// head_dim 256 on GPUs with less than 144 KB per block).
cudaError_t backward_cuda(const BackwardParams& p, cudaStream_t stream);

}  // namespace cm3leon::attention
