// The nearest-code GEMM for bf16 inputs (one storage type per translation unit: they compile in parallel).
#include "vq/vq_nearest_gemm.cuh"

namespace cm3leon::vq::nearest_gpu {

cudaError_t launch_gemm_bf16(const GemmParams& p, int row_tiles, int splits, cudaStream_t stream) {
  return launch_gemm<cutlass::bfloat16_t>(p, row_tiles, splits, stream);
}

}  // namespace cm3leon::vq::nearest_gpu
