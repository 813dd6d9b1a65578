// Torch-free CUDA entry points of the fused linear + cross-entropy (host functions: raw pointers, a stream).
// Contract: docs/loss.md. All tensors are device memory, row-major; dtype is the dtype of hidden and weight.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "common/dtype.h"
#include "loss/loss_cpu.h"

namespace cm3leon::loss {

// Validates targets / loss_weights (nullable) without a host sync: lowers *bad_target / *bad_weight (device
// values the caller initialises to LLONG_MAX) to the first offending token and adds the weights of the
// non-ignored tokens to *weight_sum (caller zeroes it).
cudaError_t check_inputs_cuda(const int64_t* targets, const float* loss_weights, const LossConfig& cfg,
                              long long* bad_target, long long* bad_weight, double* weight_sum,
                              cudaStream_t stream);

// Per token: lse[t] and loss[t] = w_t * l_t (0 where ignored), an online log-sum-exp over vocabulary tiles.
cudaError_t forward_cuda(DType dtype, const void* hidden, const void* weight, const int64_t* targets,
                         const float* loss_weights, const LossConfig& cfg, float* lse, float* loss,
                         cudaStream_t stream);

// grad_hidden_f32 [T, D] and grad_weight_f32 [V, D] (zeroed by the caller) += the gradients of
// sum_t l_t * coef, given per-token lse and the coefficients of dl/dz_v = a p_v - e - b [v == y] (docs/loss.md).
cudaError_t gradients_cuda(DType dtype, const void* hidden, const void* weight, const int64_t* targets,
                           const LossConfig& cfg, const float* lse, const float* a, const float* b,
                           const float* e, float* grad_hidden_f32, float* grad_weight_f32, cudaStream_t stream);

}  // namespace cm3leon::loss
