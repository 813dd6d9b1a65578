// cfg_sample on the GPU: the __global__ kernel around cfg_sample_row (sampling_cuda_cfg.cuh)
// and its launch.
#include "sampling/sampling_cuda_cfg.cuh"

namespace cm3leon::sampling {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) cfg_sample_kernel(const CfgParams<T> p) {
  extern __shared__ float4 dynamic_smem[];  // float4: 16-byte aligned
  __shared__ Shared sh;
  cfg_sample_row(p, blockIdx.x, reinterpret_cast<float*>(dynamic_smem), sh);
}

template <typename T>
cudaError_t launch(const void* logits, int64_t batch, int64_t row_stride, int64_t stream_stride,
                   const CfgOptions& o, double log_min_p, const Vocab& allowed, const DeviceSeeds& seeds,
                   const Outputs& out, cudaStream_t stream) {
  CfgParams<T> p = make_cfg_params<T>(logits, row_stride, stream_stride, o, log_min_p, allowed, seeds, out);
  size_t bytes = 0;
  cudaError_t err = configure_row_cache(cfg_sample_kernel<T>, p.cached, &p.cached, &bytes);
  if (err != cudaSuccess) return err;
  cfg_sample_kernel<T><<<unsigned(batch), kThreads, bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace
}  // namespace cuda

cudaError_t cfg_sample_cuda(DType dtype, const void* logits, int64_t batch, int64_t row_stride,
                            int64_t stream_stride, const CfgOptions& options, double log_min_p,
                            const Vocab& allowed, const DeviceSeeds& seeds, int64_t* tokens, float* logprobs,
                            long long* status, cudaStream_t stream) {
  if (batch == 0) return cudaSuccess;
  const cuda::Outputs out{tokens, logprobs, status};
  return dispatch_float(dtype, [&](auto tag) {
    return cuda::launch<decltype(tag)>(logits, batch, row_stride, stream_stride, options, log_min_p, allowed,
                                       seeds, out, stream);
  });
}

}  // namespace cm3leon::sampling
