// Argument checks and error reporting shared by the CPU and CUDA launchers of the sampling ops (the second
// line of defence: the Python wrappers validate first). Implemented in sampling_launch.cpp.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <optional>

#include "sampling/sampling_types.h"

namespace cm3leon::sampling {

// Checks logits [B, S, V] and the filters; returns the kernel options.
CfgOptions check_cfg_args(const at::Tensor& logits, c10::ArrayRef<double> guidance_scale, double temperature,
                          int64_t top_k, double top_p, double min_p);

// Checks expert/amateur [B, V] and the CD-K parameters; returns the kernel options.
ContrastiveOptions check_contrastive_args(const at::Tensor& expert, const at::Tensor& amateur, double alpha,
                                          int64_t k, double temperature, double amateur_temperature);

// Checks the allowed range and mask; returns them with the mask's data pointer.
Vocab check_vocab(int64_t batch, int64_t vocab, int64_t range_lo, int64_t range_hi,
                  const std::optional<at::Tensor>& allowed_mask);

// Checks the step (>= 0), the per-row seed tensor ([B] int64) and the step tensor (one int64).
void check_seed_tensors(int64_t batch, const std::optional<at::Tensor>& seeds, int64_t step,
                        const std::optional<at::Tensor>& step_tensor);

// The value of a CPU step tensor, checked >= 0 (a negative step would wrap to a far stream position).
uint64_t host_step(const at::Tensor& step_tensor);

// Throws the op's error for a bad row (no-op for RowStatus::Ok).
void raise_row_error(const RowError& e, const char* input);

}  // namespace cm3leon::sampling
