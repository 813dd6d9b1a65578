#include "sampling/sampling_launch.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <cmath>

#include "common/tensor_checks.h"
#include "sampling/sampling_checks.h"
#include "sampling/sampling_cpu.h"

namespace cm3leon::sampling {

Vocab check_vocab(int64_t batch, int64_t vocab, int64_t range_lo, int64_t range_hi,
                  const std::optional<at::Tensor>& allowed_mask) {
  TORCH_CHECK_VALUE(0 <= range_lo && range_lo < range_hi && range_hi <= vocab,
                    "allowed_range must satisfy 0 <= lo < hi <= V = ", vocab, ", got (", range_lo, ", ", range_hi,
                    ")");
  Vocab v{range_lo, range_hi, nullptr, 0};
  if (allowed_mask) {
    const at::Tensor& m = *allowed_mask;
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool, "allowed_mask must be bool, got ", m.scalar_type());
    const bool per_row = m.dim() == 2 && m.size(0) == batch && m.size(1) == vocab;
    TORCH_CHECK_VALUE((m.dim() == 1 && m.size(0) == vocab) || per_row,
                      "allowed_mask must be [V] or [B, V] = [", batch, ", ", vocab, "], got ", m.sizes());
    check_contiguous(m, "allowed_mask");
    v.mask = m.data_ptr<bool>();
    v.mask_row_stride = m.dim() == 2 ? vocab : 0;
  }
  return v;
}

void check_seed_tensors(int64_t batch, const std::optional<at::Tensor>& seeds, int64_t step,
                        const std::optional<at::Tensor>& step_tensor) {
  TORCH_CHECK_VALUE(step >= 0, "step must be >= 0, got ", step);
  if (seeds) {
    TORCH_CHECK_TYPE(seeds->scalar_type() == at::kLong, "seed tensor must be int64, got ", seeds->scalar_type());
    TORCH_CHECK_VALUE(seeds->dim() == 1 && seeds->size(0) == batch, "seed tensor must be [B] = [", batch,
                      "], got ", seeds->sizes());
    check_contiguous(*seeds, "seed");
  }
  if (step_tensor) {
    TORCH_CHECK_TYPE(step_tensor->scalar_type() == at::kLong, "step tensor must be int64, got ",
                     step_tensor->scalar_type());
    TORCH_CHECK_VALUE(step_tensor->numel() == 1, "step tensor must hold one element, got ", step_tensor->sizes());
  }
}

uint64_t host_step(const at::Tensor& step_tensor) {
  const int64_t step = step_tensor.item<int64_t>();
  TORCH_CHECK_VALUE(step >= 0, "step tensor must hold a value >= 0, got ", step);
  return uint64_t(step);
}

void raise_row_error(const RowError& e, const char* input) {
  switch (e.status) {
    case RowStatus::Ok: return;
    case RowStatus::NonFinite:
      TORCH_CHECK_VALUE(false, input, " row ", e.row,
                        " holds NaN or +inf, or mixing the streams / dividing by the temperature overflows "
                        "float32 (non-finite); -inf is allowed and excludes a token");
    case RowStatus::EmptyRow:
      TORCH_CHECK_VALUE(false, "row ", e.row,
                        " has no allowed token: allowed_range/allowed_mask and -inf logits exclude all of them");
    case RowStatus::OutOfMemory: TORCH_CHECK(false, "cm3leon sampling: out of memory for the row workspace");
  }
}

CfgOptions check_cfg_args(const at::Tensor& logits, c10::ArrayRef<double> guidance_scale, double temperature,
                          int64_t top_k, double top_p, double min_p) {
  TORCH_CHECK_VALUE(logits.dim() == 3, "logits must be [B, S, V], got ", logits.sizes());
  const int64_t streams = logits.size(1), vocab = logits.size(2);
  TORCH_CHECK_VALUE(streams >= 1 && streams <= 3, "logits must have S = 1, 2 or 3 streams, got ", streams);
  TORCH_CHECK_VALUE(int64_t(guidance_scale.size()) == streams - 1, "guidance_scale must hold S - 1 = ",
                    streams - 1, " values for S = ", streams, ", got ", guidance_scale.size());
  for (const double s : guidance_scale)
    TORCH_CHECK_VALUE(std::isfinite(float(s)), "guidance_scale must be finite (as float32), got ", s);
  TORCH_CHECK_VALUE(vocab > 0 && vocab < (int64_t(1) << 31), "V must be in [1, 2^31), got ", vocab);
  TORCH_CHECK_VALUE(logits.stride(2) == 1, "logits must be contiguous along V");
  TORCH_CHECK_VALUE(temperature >= 0 && std::isfinite(temperature), "temperature must be >= 0, got ", temperature);
  TORCH_CHECK_VALUE(top_k >= 0 && top_k <= vocab, "top_k must be in [0, V = ", vocab, "], got ", top_k);
  TORCH_CHECK_VALUE(top_p > 0 && top_p <= 1, "top_p must be in (0, 1], got ", top_p);
  TORCH_CHECK_VALUE(min_p >= 0 && min_p <= 1, "min_p must be in [0, 1], got ", min_p);
  return CfgOptions{streams,
                    streams >= 2 ? float(guidance_scale[0]) : 1.f,
                    streams == 3 ? float(guidance_scale[1]) : 0.f,
                    float(temperature), top_k, top_p, min_p};
}

ContrastiveOptions check_contrastive_args(const at::Tensor& expert, const at::Tensor& amateur, double alpha,
                                          int64_t k, double temperature, double amateur_temperature) {
  TORCH_CHECK_VALUE(expert.dim() == 2, "expert_logits must be [B, V], got ", expert.sizes());
  TORCH_CHECK_VALUE(amateur.sizes() == expert.sizes(), "amateur_logits must match expert_logits ", expert.sizes(),
                    ", got ", amateur.sizes());
  TORCH_CHECK_TYPE(amateur.scalar_type() == expert.scalar_type(), "expert_logits and amateur_logits must share a "
                   "dtype, got ", expert.scalar_type(), " and ", amateur.scalar_type());
  const int64_t vocab = expert.size(1);
  TORCH_CHECK_VALUE(vocab > 0 && vocab < (int64_t(1) << 31), "V must be in [1, 2^31), got ", vocab);
  TORCH_CHECK_VALUE(expert.stride(1) == 1 && amateur.stride(1) == 1, "logits must be contiguous along V");
  TORCH_CHECK_VALUE(alpha >= 0 && alpha <= 1, "alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(k >= 1 && k <= vocab, "k must be in [1, V = ", vocab, "], got ", k);
  TORCH_CHECK_VALUE(temperature >= 0 && std::isfinite(temperature), "temperature must be >= 0, got ", temperature);
  TORCH_CHECK_VALUE(amateur_temperature > 0 && std::isfinite(amateur_temperature),
                    "amateur_temperature must be > 0, got ", amateur_temperature);
  return ContrastiveOptions{alpha, k, float(temperature), float(amateur_temperature)};
}

namespace {

void check_on_cpu(const std::optional<at::Tensor>& t, const char* name) {
  if (t) TORCH_CHECK_VALUE(t->is_cpu(), name, " must be on the logits' device (cpu), got ", t->device());
}

SeedSpec host_seeds(int64_t batch, int64_t seed, const std::optional<at::Tensor>& seeds, int64_t step,
                    const std::optional<at::Tensor>& step_tensor) {
  check_seed_tensors(batch, seeds, step, step_tensor);
  check_on_cpu(seeds, "seed tensor");
  check_on_cpu(step_tensor, "step tensor");
  SeedSpec s{nullptr, seed, uint64_t(step)};
  if (seeds) s.per_row = seeds->data_ptr<int64_t>();
  if (step_tensor) s.step = host_step(*step_tensor);
  return s;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cfg_sample_cpu_launch(CM3LEON_CFG_SAMPLE_PARAMS) {
  const CfgOptions options = check_cfg_args(logits, guidance_scale, temperature, top_k, top_p, min_p);
  const int64_t batch = logits.size(0), vocab = logits.size(2);
  const DType dtype = float_dtype(logits, "logits");
  check_on_cpu(allowed_mask, "allowed_mask");
  const Vocab allowed = check_vocab(batch, vocab, range_lo, range_hi, allowed_mask);
  const SeedSpec seed_spec = host_seeds(batch, seed, seeds, step, step_tensor);
  at::Tensor tokens = at::empty({batch}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({batch}, logits.options().dtype(at::kFloat));
  const RowError err = cfg_sample_cpu(dtype, logits.data_ptr(), batch, logits.stride(0), logits.stride(1), options,
                                      allowed, seed_spec, tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(),
                                      at::get_num_threads());
  raise_row_error(err, "logits");
  return {tokens, logprobs};
}

std::tuple<at::Tensor, at::Tensor> contrastive_sample_cpu_launch(CM3LEON_CONTRASTIVE_SAMPLE_PARAMS) {
  const ContrastiveOptions options =
      check_contrastive_args(expert, amateur, alpha, k, temperature, amateur_temperature);
  const int64_t batch = expert.size(0), vocab = expert.size(1);
  const DType dtype = float_dtype(expert, "expert_logits");
  TORCH_CHECK_VALUE(amateur.is_cpu(), "amateur_logits must be on expert_logits' device (cpu), got ", amateur.device());
  check_on_cpu(allowed_mask, "allowed_mask");
  const Vocab allowed = check_vocab(batch, vocab, range_lo, range_hi, allowed_mask);
  const SeedSpec seed_spec = host_seeds(batch, seed, seeds, step, step_tensor);
  at::Tensor tokens = at::empty({batch}, expert.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({batch}, expert.options().dtype(at::kFloat));
  const RowError err =
      contrastive_sample_cpu(dtype, expert.data_ptr(), amateur.data_ptr(), batch, expert.stride(0), amateur.stride(0),
                             options, allowed, seed_spec, tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>(),
                             at::get_num_threads());
  raise_row_error(err, "expert_logits/amateur_logits");
  return {tokens, logprobs};
}

}  // namespace cm3leon::sampling
