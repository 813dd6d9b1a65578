// cfg_sample on the GPU: the __global__ kernel around cfg_sample_row (sampling_cuda_cfg.cuh) and its launch.
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
  CfgParams<T> p;
  p.logits = static_cast<const T*>(logits);
  p.row_stride = row_stride;
  p.stream_stride = stream_stride;
  p.streams = int(o.streams);
  p.s0 = o.scale0;
  p.s1 = o.scale1;
  p.inv_t = o.temperature > 0.f ? 1.f / o.temperature : 1.f;
  p.greedy = o.temperature == 0.f;
  p.use_min_p = o.min_p > 0.0;
  p.top_k = o.top_k;
  p.top_p = o.top_p;
  p.log_min_p = log_min_p;
  const int64_t width = allowed.range_hi - allowed.range_lo;
  p.weight_scale = weight_scale(width);
  p.allowed = allowed;
  p.seeds = seeds;
  p.out = out;
  size_t bytes = 0;
  cudaError_t err = configure_row_cache(cfg_sample_kernel<T>, width, &p.cached, &bytes);
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
