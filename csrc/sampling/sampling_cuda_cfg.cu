// cfg_sample on the GPU: one block per row around sample_row (sampling_cuda_cfg.cuh).
#include "sampling/sampling_cuda_cfg.cuh"
#include "sampling/sampling_cuda_grid.cuh"

namespace cm3leon::sampling {

cudaError_t cfg_sample_cuda(DType dtype, const void* logits, int64_t batch, int64_t row_stride,
                            int64_t stream_stride, const CfgOptions& options, double log_min_p,
                            const Vocab& allowed, const DeviceSeeds& seeds, int64_t* tokens, float* logprobs,
                            long long* status, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  const cuda::Outputs out{tokens, logprobs, status};
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    return cuda::launch_rows(
        cuda::make_cfg_params<T>(logits, row_stride, stream_stride, options, log_min_p, allowed, seeds, out),
        batch, stream);
  });
}

}  // namespace cm3leon::sampling
