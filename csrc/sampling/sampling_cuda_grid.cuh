// The grid both samplers launch: one block of kThreads per row, the row's tokens cached in dynamic shared
// memory. Kept out of the *_row headers, which the host emulator (tests/sampling_cuda_emulator.cpp) compiles.
#pragma once
#include <cuda_runtime.h>

#include "sampling/sampling_cuda_rows.cuh"

namespace cm3leon::sampling::cuda {

// sample_row is the op's row sampler, overloaded on its Params (sampling_cuda_cfg.cuh / _contrastive.cuh).
template <typename Params>
__global__ void __launch_bounds__(kThreads, 1) sample_rows_kernel(const Params p) {
  extern __shared__ float4 dynamic_smem[];  // float4: 16-byte aligned
  __shared__ Shared sh;
  sample_row(p, blockIdx.x, reinterpret_cast<float*>(dynamic_smem), sh);
}

template <typename Params>
cudaError_t launch_rows(Params p, int64_t batch, cudaStream_t stream) {
  size_t bytes = 0;
  cudaError_t err = configure_row_cache(sample_rows_kernel<Params>, p.cached, &p.cached, &bytes);
  if (err != cudaSuccess) return err;
  sample_rows_kernel<Params><<<unsigned(batch), kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace cm3leon::sampling::cuda
