// Shared at::Tensor helpers for the thin launchers (the second line of defence: Python validates first).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/dtype.h"

namespace cm3leon {

inline DType float_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default: TORCH_CHECK_TYPE(false, name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
}

inline void check_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace cm3leon
