// at::Tensor entry points of the sampling ops (registered in ops.cpp). Both return (tokens int64 [B],
// logprobs float32 [B]); the Python wrappers drop logprobs unless asked for.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <optional>
#include <tuple>

namespace cm3leon::sampling {

// The schemas' arguments, as the CPU and CUDA launchers of each op take them.
#define CM3LEON_CFG_SAMPLE_PARAMS                                                                                   \
  const at::Tensor& logits, c10::ArrayRef<double> guidance_scale, double temperature, int64_t top_k,                \
  double top_p, double min_p, int64_t range_lo, int64_t range_hi, const std::optional<at::Tensor>& allowed_mask,    \
  int64_t seed, const std::optional<at::Tensor>& seeds, int64_t step,                                               \
  const std::optional<at::Tensor>& step_tensor
#define CM3LEON_CONTRASTIVE_SAMPLE_PARAMS                                                                           \
  const at::Tensor& expert, const at::Tensor& amateur, double alpha, int64_t k, double temperature,                 \
  double amateur_temperature, int64_t range_lo, int64_t range_hi, const std::optional<at::Tensor>& allowed_mask,    \
  int64_t seed, const std::optional<at::Tensor>& seeds, int64_t step,                                               \
  const std::optional<at::Tensor>& step_tensor

std::tuple<at::Tensor, at::Tensor> cfg_sample_cpu_launch(CM3LEON_CFG_SAMPLE_PARAMS);

std::tuple<at::Tensor, at::Tensor> contrastive_sample_cpu_launch(CM3LEON_CONTRASTIVE_SAMPLE_PARAMS);

#ifdef CM3LEON_WITH_CUDA
// The same ops on CUDA tensors (sampling_cuda_launch.cpp).
std::tuple<at::Tensor, at::Tensor> cfg_sample_cuda_launch(CM3LEON_CFG_SAMPLE_PARAMS);

std::tuple<at::Tensor, at::Tensor> contrastive_sample_cuda_launch(CM3LEON_CONTRASTIVE_SAMPLE_PARAMS);
#endif

}  // namespace cm3leon::sampling
