// Torch-free CUDA entry points of the fused linear + cross-entropy (host functions: raw pointers, a stream).
// Contract: docs/loss.md. All tensors are device memory, row-major. One path per input dtype, chosen by the
// launcher: fp32 runs SIMT kernels in exact fp32 (loss_cuda.cu; TF32 tensor cores would round the inputs),
// bf16 / fp16 run CuTe tensor-core kernels with fp32 accumulation (loss_mma.cuh).
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "loss/loss_cpu.h"

namespace cm3leon::loss {

// Validates targets / loss_weights (nullable) without a host sync: lowers *bad_target / *bad_weight (device
// values the caller initialises to LLONG_MAX) to the first offending token and adds the weights of the
// non-ignored tokens to *weight_sum (caller zeroes it).
cudaError_t check_inputs_cuda(const int64_t* targets, const float* loss_weights, const LossConfig& cfg,
                              long long* bad_target, long long* bad_weight, double* weight_sum,
                              cudaStream_t stream);

// Bytes of device workspace the forward of `dtype` needs for cfg on the current device (0 for float32).
cudaError_t forward_workspace_cuda(DType dtype, const LossConfig& cfg, size_t* bytes);

// Forward, per token: lse[t] and loss[t] = w_t * l_t (0 where ignored), an online log-sum-exp over vocabulary
// tiles. hidden and weight are of the function's dtype; workspace has forward_workspace_cuda's bytes.
#define CM3LEON_LOSS_CUDA_FORWARD_PARAMS                                                                            \
  const void *hidden, const void *weight, const int64_t *targets, const float *loss_weights,                       \
      const LossConfig &cfg, float *lse, float *loss, void *workspace, cudaStream_t stream
// Gradients: grad_hidden_f32 [T, D] and grad_weight_f32 [V, D] (zeroed by the caller) += the gradients of
// sum_t l_t * coef, given per-token lse and the coefficients of dl/dz_v = a p_v - e - b [v == y]
// (docs/loss.md); fp32 atomics, so the result's rounding depends on the order of the adds.
#define CM3LEON_LOSS_CUDA_GRADIENT_PARAMS                                                                           \
  const void *hidden, const void *weight, const int64_t *targets, const LossConfig &cfg, const float *lse,         \
      const float *a, const float *b, const float *e, float *grad_hidden_f32, float *grad_weight_f32,              \
      cudaStream_t stream

cudaError_t forward_fp32_cuda(CM3LEON_LOSS_CUDA_FORWARD_PARAMS);
cudaError_t forward_bf16_cuda(CM3LEON_LOSS_CUDA_FORWARD_PARAMS);
cudaError_t forward_fp16_cuda(CM3LEON_LOSS_CUDA_FORWARD_PARAMS);
cudaError_t gradients_fp32_cuda(CM3LEON_LOSS_CUDA_GRADIENT_PARAMS);
cudaError_t gradients_bf16_cuda(CM3LEON_LOSS_CUDA_GRADIENT_PARAMS);
cudaError_t gradients_fp16_cuda(CM3LEON_LOSS_CUDA_GRADIENT_PARAMS);

}  // namespace cm3leon::loss
