// Torch-free element types and the dispatch from a runtime tag to a kernel template.
#pragma once
#include <stdexcept>
#include "common/half.h"

namespace cm3leon {

enum class DType { Float32, BFloat16, Float16 };

CM3LEON_ISA_BEGIN

// Calls f(T{}) with T the C++ storage type for `dtype`; kernels are templates over T.
template <typename F>
decltype(auto) dispatch_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::BFloat16: return f(bf16{});
    case DType::Float16: return f(fp16{});
  }
  throw std::invalid_argument("cm3leon: unsupported dtype");
}

CM3LEON_ISA_END
}  // namespace cm3leon
