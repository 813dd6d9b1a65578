// contrastive_sample on the GPU: the __global__ kernel around contrastive_sample_row (sampling_cuda_contrastive.cuh)
// and its launch.
#include "sampling/sampling_cuda_contrastive.cuh"

namespace cm3leon::sampling {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) contrastive_sample_kernel(const ContrastiveParams<T> p) {
  extern __shared__ float4 dynamic_smem[];  // float4: 16-byte aligned
  __shared__ Shared sh;
  contrastive_sample_row(p, blockIdx.x, reinterpret_cast<float*>(dynamic_smem), sh);
}

template <typename T>
cudaError_t launch(const void* expert, const void* amateur, int64_t batch, int64_t expert_row_stride,
                   int64_t amateur_row_stride, const ContrastiveOptions& o, double log_alpha, const Vocab& allowed,
                   const DeviceSeeds& seeds, const Outputs& out, cudaStream_t stream) {
  ContrastiveParams<T> p = make_contrastive_params<T>(expert, amateur, expert_row_stride, amateur_row_stride, o,
                                                       log_alpha, allowed, seeds, out);
  size_t bytes = 0;
  cudaError_t err = configure_row_cache(contrastive_sample_kernel<T>, p.cached, &p.cached, &bytes);
  if (err != cudaSuccess) return err;
  contrastive_sample_kernel<T><<<unsigned(batch), kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda

cudaError_t contrastive_sample_cuda(DType dtype, const void* expert, const void* amateur, int64_t batch,
                                    int64_t expert_row_stride, int64_t amateur_row_stride,
                                    const ContrastiveOptions& options, double log_alpha, const Vocab& allowed,
                                    const DeviceSeeds& seeds, int64_t* tokens, float* logprobs,
                                    long long* status, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  const cuda::Outputs out{tokens, logprobs, status};
  return dispatch_float(dtype, [&](auto tag) {
    return cuda::launch<decltype(tag)>(expert, amateur, batch, expert_row_stride, amateur_row_stride, options,
                                       log_alpha, allowed, seeds, out, stream);
  });
}

}  // namespace cm3leon::sampling
