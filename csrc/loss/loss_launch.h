// at::Tensor entry points of the fused linear + cross-entropy ops (registered in ops.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>
#include <tuple>

#include "loss/loss_cpu.h"

namespace cm3leon::loss {

// The schemas' arguments, as the CPU and CUDA launchers of each op take them.
#define CM3LEON_LOSS_FORWARD_PARAMS                                                                                 \
  const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,                                    \
  const std::optional<at::Tensor>& loss_weights, int64_t ignore_index, double label_smoothing, double z_loss,       \
  double softcap, int64_t reduction, bool compute_grad
#define CM3LEON_LOSS_BACKWARD_PARAMS                                                                                \
  const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,       \
  const std::optional<at::Tensor>& loss_weights, const at::Tensor& lse, int64_t ignore_index,                       \
  double label_smoothing, double z_loss, double softcap

// Shapes, dtypes, devices and scalars shared by the CPU and CUDA launchers (data checks run in the kernels).
LossConfig check_args(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                      const std::optional<at::Tensor>& loss_weights, int64_t ignore_index,
                      double label_smoothing, double z_loss, double softcap);
// check_args, and grad_loss and lse as the backward takes them.
LossConfig check_backward_args(CM3LEON_LOSS_BACKWARD_PARAMS);
// reduction is 0 (none), 1 (sum) or 2 (mean); gradients in the forward need a reduced loss.
void check_reduction(int64_t reduction, bool compute_grad);
// A float32 [tokens] tensor on hidden's device (grad_loss, lse, loss_weights).
void check_float32_vector(const at::Tensor& t, const char* name, int64_t tokens, const at::Tensor& hidden);
// Raises the error of a failed data check (IndexError for targets, ValueError otherwise).
void raise_status(const LossStatus& s, const at::Tensor& targets, const std::optional<at::Tensor>& loss_weights,
                  int64_t vocab, const char* nonfinite_inputs);

// (loss: [T] for reduction 0 (none), [] for 1 (sum) / 2 (mean); lse float32 [T]; grad_hidden [T, D] and
// grad_weight [V, D] of the reduced loss when compute_grad, else empty [0] tensors).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu_launch(CM3LEON_LOSS_FORWARD_PARAMS);

// (grad_hidden, grad_weight) of sum_t grad_loss[t] * loss_t (loss_t the per-token weighted loss).
std::tuple<at::Tensor, at::Tensor> backward_cpu_launch(CM3LEON_LOSS_BACKWARD_PARAMS);

#ifdef CM3LEON_WITH_CUDA
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda_launch(CM3LEON_LOSS_FORWARD_PARAMS);
std::tuple<at::Tensor, at::Tensor> backward_cuda_launch(CM3LEON_LOSS_BACKWARD_PARAMS);
#endif

}  // namespace cm3leon::loss
