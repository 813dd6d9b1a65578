// The nearest-code GEMM for fp32 inputs (one storage type per translation unit: they compile in parallel).
#include "vq/vq_nearest_gemm.cuh"

namespace cm3leon::vq::nearest_gpu {

cudaError_t launch_gemm_fp32(const GemmParams& p, int row_tiles, int splits, cudaStream_t stream) {
  return launch_gemm<float>(p, row_tiles, splits, stream);
}

}  // namespace cm3leon::vq::nearest_gpu
