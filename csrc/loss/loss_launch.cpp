#include "loss/loss_launch.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <cmath>

#include "common/tensor_checks.h"
#include "loss/loss_cpu.h"

namespace cm3leon::loss {

void check_float32_vector(const at::Tensor& t, const char* name, int64_t tokens, const at::Tensor& hidden) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == tokens, name, " must be [T] with T = ", tokens,
                    " (hidden's rows), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == hidden.device(), name, " must be on hidden's device (", hidden.device(),
                    "), got ", t.device());
  check_contiguous(t, name);
}

void check_reduction(int64_t reduction, bool compute_grad) {
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, "reduction must be 0 (none), 1 (sum) or 2 (mean), got ",
                    reduction);
  TORCH_CHECK_VALUE(!compute_grad || reduction != 0,
                    "compute_grad needs reduction sum or mean (reduction none differentiates in backward)");
}

LossConfig check_args(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& targets,
                      const std::optional<at::Tensor>& loss_weights, int64_t ignore_index,
                      double label_smoothing, double z_loss, double softcap) {
  TORCH_CHECK_VALUE(hidden.dim() == 2, "hidden must be 2-D [T, D], got ", hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be 2-D [V, D], got ", weight.sizes());
  TORCH_CHECK_VALUE(weight.size(0) > 0 && weight.size(1) > 0, "weight must be non-empty [V, D], got ",
                    weight.sizes());
  TORCH_CHECK_VALUE(hidden.size(1) == weight.size(1), "hidden must be [T, D] with D = ", weight.size(1),
                    " (weight's), got ", hidden.sizes());
  float_dtype(hidden, "hidden");
  TORCH_CHECK_TYPE(weight.scalar_type() == hidden.scalar_type(), "weight must have hidden's dtype (",
                   hidden.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == hidden.device(), "weight must be on hidden's device (", hidden.device(),
                    "), got ", weight.device());
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong, "targets must be int64, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == hidden.size(0), "targets must be [T] with T = ",
                    hidden.size(0), " (hidden's rows), got ", targets.sizes());
  TORCH_CHECK_VALUE(targets.device() == hidden.device(), "targets must be on hidden's device (",
                    hidden.device(), "), got ", targets.device());
  check_contiguous(hidden, "hidden");
  check_contiguous(weight, "weight");
  check_contiguous(targets, "targets");
  if (loss_weights) check_float32_vector(*loss_weights, "loss_weights", hidden.size(0), hidden);
  TORCH_CHECK_VALUE(label_smoothing >= 0.0 && label_smoothing <= 1.0,
                    "label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(z_loss >= 0.0 && std::isfinite(float(z_loss)), "z_loss must be finite and >= 0, got ", z_loss);
  TORCH_CHECK_VALUE(softcap >= 0.0 && std::isfinite(float(softcap)),
                    "softcap must be finite and > 0 (0 turns it off), got ", softcap);
  LossConfig cfg;
  cfg.tokens = hidden.size(0);
  cfg.dim = hidden.size(1);
  cfg.vocab = weight.size(0);
  cfg.ignore_index = ignore_index;
  cfg.label_smoothing = float(label_smoothing);
  cfg.z_loss = float(z_loss);
  cfg.softcap = float(softcap);
  return cfg;
}

LossConfig check_backward_args(CM3LEON_LOSS_BACKWARD_PARAMS) {
  const LossConfig cfg = check_args(hidden, weight, targets, loss_weights, ignore_index, label_smoothing, z_loss,
                                    softcap);
  check_float32_vector(grad_loss, "grad_loss", cfg.tokens, hidden);
  check_float32_vector(lse, "lse", cfg.tokens, hidden);
  return cfg;
}

void raise_status(const LossStatus& s, const at::Tensor& targets, const std::optional<at::Tensor>& loss_weights,
                  int64_t vocab, const char* nonfinite_inputs) {
  switch (s.kind) {
    case LossStatus::Ok: return;
    case LossStatus::TargetOutOfRange:
      TORCH_CHECK_INDEX(false, "targets out of range: targets[", s.index, "] = ",
                        targets.data_ptr<int64_t>()[s.index], " is not in [0, ", vocab,
                        ") and is not ignore_index");
    case LossStatus::BadWeight:
      TORCH_CHECK_VALUE(false, "loss_weights must be finite and >= 0, got loss_weights[", s.index, "] = ",
                        loss_weights->data_ptr<float>()[s.index]);
    case LossStatus::NonFinite:
      TORCH_CHECK_VALUE(false, nonfinite_inputs, " hold NaN/inf: the log-sum-exp of token ", s.index,
                        " is not finite");
  }
}

namespace {

const float* optional_data(const std::optional<at::Tensor>& t) {
  return t ? t->data_ptr<float>() : nullptr;
}

// The fp32 accumulator of grad_weight: the output itself for fp32 weights.
at::Tensor grad_weight_accumulator(const at::Tensor& weight) {
  return at::empty(weight.sizes(), weight.options().dtype(at::kFloat));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_cpu_launch(CM3LEON_LOSS_FORWARD_PARAMS) {
  const LossConfig cfg = check_args(hidden, weight, targets, loss_weights, ignore_index, label_smoothing, z_loss,
                                    softcap);
  check_reduction(reduction, compute_grad);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor loss = reduction == 0 ? at::empty({cfg.tokens}, f32) : at::empty({}, f32);
  at::Tensor lse = at::empty({cfg.tokens}, f32);
  at::Tensor grad_hidden = compute_grad ? at::empty(hidden.sizes(), hidden.options()) : at::empty({0}, hidden.options());
  at::Tensor grad_weight = compute_grad ? grad_weight_accumulator(weight) : at::empty({0}, weight.options());
  const LossStatus status =
      forward_cpu(float_dtype(hidden, "hidden"), hidden.data_ptr(), weight.data_ptr(), targets.data_ptr<int64_t>(),
                  optional_data(loss_weights), cfg, Reduction(reduction), loss.data_ptr<float>(), lse.data_ptr<float>(),
                  compute_grad ? grad_hidden.data_ptr() : nullptr,
                  compute_grad ? grad_weight.data_ptr<float>() : nullptr, at::get_num_threads());
  raise_status(status, targets, loss_weights, cfg.vocab, "hidden or weight");
  if (compute_grad && weight.scalar_type() != at::kFloat) grad_weight = grad_weight.to(weight.scalar_type());
  return {loss, lse, grad_hidden, grad_weight};
}

std::tuple<at::Tensor, at::Tensor> backward_cpu_launch(CM3LEON_LOSS_BACKWARD_PARAMS) {
  const LossConfig cfg = check_backward_args(grad_loss, hidden, weight, targets, loss_weights, lse, ignore_index,
                                             label_smoothing, z_loss, softcap);
  at::Tensor grad_hidden = at::empty(hidden.sizes(), hidden.options());
  at::Tensor grad_weight = grad_weight_accumulator(weight);
  const LossStatus status =
      backward_cpu(float_dtype(hidden, "hidden"), hidden.data_ptr(), weight.data_ptr(), targets.data_ptr<int64_t>(),
                   optional_data(loss_weights), cfg, lse.data_ptr<float>(), grad_loss.data_ptr<float>(),
                   grad_hidden.data_ptr(), grad_weight.data_ptr<float>(), at::get_num_threads());
  raise_status(status, targets, loss_weights, cfg.vocab, "hidden, weight or lse");
  if (weight.scalar_type() != at::kFloat) grad_weight = grad_weight.to(weight.scalar_type());
  return {grad_hidden, grad_weight};
}

}  // namespace cm3leon::loss
