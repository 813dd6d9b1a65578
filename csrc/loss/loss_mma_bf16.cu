// The tensor-core loss kernels for bf16 inputs (one storage type per translation unit: they compile in parallel).
#include "loss/loss_cuda.h"
#include "loss/loss_mma.cuh"

namespace cm3leon::loss {

cudaError_t forward_bf16_cuda(CM3LEON_LOSS_CUDA_FORWARD_PARAMS) {
  return mma::forward<cutlass::bfloat16_t>(hidden, weight, targets, loss_weights, cfg, lse, loss, workspace,
                                           stream);
}

cudaError_t gradients_bf16_cuda(CM3LEON_LOSS_CUDA_GRADIENT_PARAMS) {
  return mma::gradients<cutlass::bfloat16_t>(hidden, weight, targets, cfg, lse, a, b, e, grad_hidden_f32,
                                             grad_weight_f32, stream);
}

}  // namespace cm3leon::loss
