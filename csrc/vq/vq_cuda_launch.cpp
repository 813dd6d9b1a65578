#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAGuard.h>
#include <climits>

#include "common/tensor_checks.h"
#include "vq/vq_cuda.h"
#include "vq/vq_launch.h"

namespace cm3leon::vq {

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
