#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAGuard.h>
#include <climits>
#include <cstdint>

#include "common/tensor_checks.h"
#include "vq/vq_cuda.h"
#include "vq/vq_launch.h"

namespace cm3leon::vq {

std::tuple<at::Tensor, at::Tensor> nearest_cuda_launch(const at::Tensor& z, const at::Tensor& codebook,
                                                       c10::string_view metric) {
  const Metric kind = check_nearest_args(z, codebook, metric);
  TORCH_CHECK_VALUE(codebook.size(0) <= INT32_MAX && codebook.size(1) <= INT32_MAX && z.size(0) <= INT32_MAX,
                    "vq_nearest on CUDA supports N, K, D < 2^31, got z ", z.sizes(), " and codebook ",
                    codebook.sizes());
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t n = z.size(0);
  at::Tensor indices = at::empty({n}, z.options().dtype(at::kLong));
  at::Tensor distance = at::empty({n}, z.options().dtype(at::kFloat));
  if (n == 0) return {indices, distance};
  const DType dtype = float_dtype(z, "z");
  NearestPlan plan;
  cudaError_t err = plan_nearest_cuda(dtype, z.data_ptr(), codebook.data_ptr(), n, codebook.size(0),
                                      codebook.size(1), &plan);
  TORCH_CHECK(err == cudaSuccess, "vq_nearest CUDA planning failed: ", cudaGetErrorString(err));
  // Workspace (documented in docs/vq.md): per-code statistics, the code splits' candidates, padded copies.
  at::Tensor workspace = at::empty({int64_t(plan.workspace_bytes)}, z.options().dtype(at::kByte));
  err = nearest_cuda(plan, dtype, z.data_ptr(), codebook.data_ptr(), kind, workspace.data_ptr(),
                     indices.data_ptr<int64_t>(), distance.data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "vq_nearest CUDA launch failed: ", cudaGetErrorString(err));
  // One scalar read keeps the NaN/inf check exact (as on the CPU); it is the only sync of the op.
  const int64_t non_finite = workspace.narrow(0, 0, 8).view(at::kLong).item<int64_t>();
  TORCH_CHECK_VALUE(non_finite == 0, "z or codebook holds NaN/inf: ", non_finite,
                    " row(s) of z have no finite distance");
  return {indices, distance};
}

at::Tensor embed_cuda_launch(const at::Tensor& indices, const at::Tensor& codebook) {
  TORCH_CHECK_VALUE(codebook.dim() == 2 && codebook.size(0) > 0, "codebook must be a non-empty [K, D] tensor");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "indices must be int64, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 1, "indices must be 1-D, got ", indices.sizes());
  TORCH_CHECK_VALUE(indices.device() == codebook.device(), "indices and codebook must be on the same device");
  check_contiguous(indices, "indices");
  check_contiguous(codebook, "codebook");
  const c10::cuda::CUDAGuard guard(codebook.device());
  at::Tensor out = at::empty({indices.size(0), codebook.size(1)}, codebook.options());
  at::Tensor bad = at::full({1}, LLONG_MAX, indices.options());
  const cudaError_t err = embed_cuda(float_dtype(codebook, "codebook"), indices.data_ptr<int64_t>(),
                                     codebook.data_ptr(), indices.size(0), codebook.size(0), codebook.size(1),
                                     out.data_ptr(), reinterpret_cast<long long*>(bad.data_ptr<int64_t>()),
                                     c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "vq_embed CUDA launch failed: ", cudaGetErrorString(err));
  // One scalar read keeps the out-of-range check exact; it is the only sync of the op.
  const int64_t first_bad = bad.item<int64_t>();
  TORCH_CHECK_INDEX(first_bad == LLONG_MAX, "indices out of range: position ", first_bad, " is not in [0, ",
                    codebook.size(0), ")");
  return out;
}

}  // namespace cm3leon::vq
