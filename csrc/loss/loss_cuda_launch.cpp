// CUDA launchers of the fused linear + cross-entropy (compiled only in CUDA builds). The forward computes loss
// and lse; gradients always come from the recomputing gradient kernel (docs/loss.md, "CUDA"). The kernels are
// chosen by dtype: exact fp32 SIMT kernels for float32, tensor-core kernels for bfloat16 / float16.
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <climits>

#include "common/tensor_checks.h"
#include "loss/loss_cuda.h"
#include "loss/loss_launch.h"

namespace cm3leon::loss {

namespace {

// The kernels of one input dtype.
struct Kernels {
  cudaError_t (*forward)(CM3LEON_LOSS_CUDA_FORWARD_PARAMS);
  cudaError_t (*gradients)(CM3LEON_LOSS_CUDA_GRADIENT_PARAMS);
};

Kernels kernels_for(DType dtype) {
  switch (dtype) {
    case DType::Float32: return {forward_fp32_cuda, gradients_fp32_cuda};
    case DType::BFloat16: return {forward_bf16_cuda, gradients_bf16_cuda};
    case DType::Float16: return {forward_fp16_cuda, gradients_fp16_cuda};
  }
  TORCH_CHECK(false, "linear_cross_entropy: unsupported dtype");
}

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "linear_cross_entropy CUDA ", what, " failed: ", cudaGetErrorString(err));
}

// Checks targets and weights on the device; returns the sum of the weights of non-ignored tokens.
double check_data(const at::Tensor& targets, const std::optional<at::Tensor>& loss_weights, const LossConfig& cfg) {
  at::Tensor bad = at::full({2}, LLONG_MAX, targets.options());
  at::Tensor total = at::zeros({1}, targets.options().dtype(at::kDouble));
  auto* flags = reinterpret_cast<long long*>(bad.data_ptr<int64_t>());
  check_cuda(check_inputs_cuda(targets.data_ptr<int64_t>(), loss_weights ? loss_weights->data_ptr<float>() : nullptr,
                               cfg, flags, flags + 1, total.data_ptr<double>(), c10::cuda::getCurrentCUDAStream()),
             "input check");
  const at::Tensor host = bad.cpu();
  const int64_t bad_target = host.data_ptr<int64_t>()[0], bad_weight = host.data_ptr<int64_t>()[1];
  if (bad_target != LLONG_MAX) raise_status({LossStatus::TargetOutOfRange, bad_target}, targets.cpu(), {}, cfg.vocab, "");
  if (bad_weight != LLONG_MAX)
    raise_status({LossStatus::BadWeight, bad_weight}, targets, loss_weights->cpu(), cfg.vocab, "");
  return total.item<double>();
}

void check_finite(const at::Tensor& lse, const char* inputs) {
  const at::Tensor bad = lse.isfinite().logical_not().nonzero();
  if (bad.numel()) raise_status({LossStatus::NonFinite, bad[0][0].item<int64_t>()}, lse, {}, 0, inputs);
}

// grad_hidden / grad_weight (inputs' dtypes) of sum_t scale[t] * w_t * l_t.
std::tuple<at::Tensor, at::Tensor> gradients(const at::Tensor& hidden, const at::Tensor& weight,
                                             const at::Tensor& targets, const std::optional<at::Tensor>& loss_weights,
                                             const LossConfig& cfg, const at::Tensor& lse, const at::Tensor& scale) {
  at::Tensor c = scale.mul(targets.ne(cfg.ignore_index).to(at::kFloat));
  if (loss_weights) c = c.mul(*loss_weights);
  const at::Tensor a = c.mul(lse.mul(2.0 * cfg.z_loss).add(1.0)).contiguous();
  const at::Tensor b = c.mul(1.0 - cfg.label_smoothing).contiguous();
  const at::Tensor e = c.mul(cfg.label_smoothing / double(cfg.vocab)).contiguous();
  at::Tensor gh = at::zeros(hidden.sizes(), hidden.options().dtype(at::kFloat));
  at::Tensor gw = at::zeros(weight.sizes(), weight.options().dtype(at::kFloat));
  const Kernels kernels = kernels_for(float_dtype(hidden, "hidden"));
  check_cuda(kernels.gradients(hidden.data_ptr(), weight.data_ptr(), targets.data_ptr<int64_t>(), cfg,
                               lse.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(), e.data_ptr<float>(),
                               gh.data_ptr<float>(), gw.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()),
             "gradient kernel");
  return {gh.to(hidden.scalar_type()), gw.to(weight.scalar_type())};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cuda_launch(CM3LEON_LOSS_FORWARD_PARAMS) {
  const LossConfig cfg = check_args(hidden, weight, targets, loss_weights, ignore_index, label_smoothing, z_loss,
                                    softcap);
  check_reduction(reduction, compute_grad);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const double weight_sum = check_data(targets, loss_weights, cfg);
  at::Tensor lse = at::empty({cfg.tokens}, hidden.options().dtype(at::kFloat));
  at::Tensor per_token = at::empty({cfg.tokens}, hidden.options().dtype(at::kFloat));
  const DType dtype = float_dtype(hidden, "hidden");
  size_t workspace_bytes = 0;
  check_cuda(forward_workspace_cuda(dtype, cfg, &workspace_bytes), "forward planning");
  at::Tensor workspace = at::empty({int64_t(workspace_bytes)}, hidden.options().dtype(at::kByte));
  check_cuda(kernels_for(dtype).forward(hidden.data_ptr(), weight.data_ptr(), targets.data_ptr<int64_t>(),
                                        loss_weights ? loss_weights->data_ptr<float>() : nullptr, cfg,
                                        lse.data_ptr<float>(), per_token.data_ptr<float>(), workspace.data_ptr(),
                                        c10::cuda::getCurrentCUDAStream()),
             "forward kernel");
  check_finite(lse, "hidden or weight");
  const double mean_scale = reduction == 2 ? (weight_sum > 0 ? 1.0 / weight_sum : 0.0) : 1.0;
  at::Tensor loss = reduction == 0 ? per_token : per_token.to(at::kDouble).sum().mul(mean_scale).to(at::kFloat);
  at::Tensor grad_hidden = at::empty({0}, hidden.options()), grad_weight = at::empty({0}, weight.options());
  if (compute_grad)
    std::tie(grad_hidden, grad_weight) =
        gradients(hidden, weight, targets, loss_weights, cfg, lse, at::full({cfg.tokens}, mean_scale, lse.options()));
  return {loss, lse, grad_hidden, grad_weight};
}

std::tuple<at::Tensor, at::Tensor> backward_cuda_launch(CM3LEON_LOSS_BACKWARD_PARAMS) {
  const LossConfig cfg = check_backward_args(grad_loss, hidden, weight, targets, loss_weights, lse, ignore_index,
                                             label_smoothing, z_loss, softcap);
  const c10::cuda::CUDAGuard guard(hidden.device());
  check_data(targets, loss_weights, cfg);
  check_finite(lse, "hidden, weight or lse");
  return gradients(hidden, weight, targets, loss_weights, cfg, lse, grad_loss);
}

}  // namespace cm3leon::loss
