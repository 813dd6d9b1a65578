// contrastive_sample on the GPU: one block per row around sample_row
// (sampling_cuda_contrastive.cuh).
#include "sampling/sampling_cuda_contrastive.cuh"
#include "sampling/sampling_cuda_grid.cuh"

namespace cm3leon::sampling {

cudaError_t contrastive_sample_cuda(DType dtype, const void* expert, const void* amateur, int64_t batch,
                                    int64_t expert_row_stride, int64_t amateur_row_stride,
                                    const ContrastiveOptions& options, double log_alpha, const Vocab& allowed,
                                    const DeviceSeeds& seeds, int64_t* tokens, float* logprobs,
                                    long long* status, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  const cuda::Outputs out{tokens, logprobs, status};
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    return cuda::launch_rows(
        cuda::make_contrastive_params<T>(expert, amateur, expert_row_stride, amateur_row_stride, options,
                                         log_alpha, allowed, seeds, out),
        batch, stream);
  });
}

}  // namespace cm3leon::sampling
