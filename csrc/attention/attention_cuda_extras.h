// Internal to the CUDA attention launchers (forward, backward, KV cache): the AttnParams fields they fill the
// same way (the checked window / softcap / ALiBi arguments, a dense call's sizes).
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>

#include "attention/attention_checks.h"

namespace cm3leon::attention {

namespace cuda {
struct AttnParams;
}

// The extras (checked by check_extras, which gives alibi_stride) as AttnParams fields (forward and backward).
void set_extras(cuda::AttnParams& p, int64_t window_left, int64_t window_right, double softcap,
                const std::optional<at::Tensor>& alibi_slopes, int64_t alibi_stride);

// Sizes of a dense [B, S, H, D] call (q and k as given) as AttnParams fields; the caller has checked that the
// batch and sequence lengths fit in int32.
void set_dense_layout(cuda::AttnParams& p, const at::Tensor& q, const at::Tensor& k);

}  // namespace cm3leon::attention
