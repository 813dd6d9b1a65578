// at::Tensor entry points of the VQ ops (registered in ops.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>
#include <tuple>

#include "vq/vq_cpu.h"

namespace cm3leon::vq {

// Checks vq_nearest's arguments (shared by the CPU and CUDA launchers) and returns the metric.
Metric check_nearest_args(const at::Tensor& z, const at::Tensor& codebook, c10::string_view metric);

std::tuple<at::Tensor, at::Tensor> nearest_cpu_launch(const at::Tensor& z, const at::Tensor& codebook,
                                                      c10::string_view metric);
at::Tensor embed_cpu_launch(const at::Tensor& indices, const at::Tensor& codebook);
#ifdef CM3LEON_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> nearest_cuda_launch(const at::Tensor& z, const at::Tensor& codebook,
                                                       c10::string_view metric);
at::Tensor embed_cuda_launch(const at::Tensor& indices, const at::Tensor& codebook);
#endif

}  // namespace cm3leon::vq
