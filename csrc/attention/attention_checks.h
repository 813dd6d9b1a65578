// Argument checks shared by the CPU and CUDA attention launchers (defined in attention_launch.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace cm3leon::attention {

// Matching dtypes (float32/bf16/fp16) and devices, head counts (GQA), head dim (multiple of 8 in [8, 256]),
// k/v shapes, contiguity; messages name the arguments kn / vn as the caller knows them.
void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t ndim, const char* kn = "k",
               const char* vn = "v");

// softmax_scale must be finite as a float32 (the kernels' type): a NaN or infinite scale would silently give
// NaN or zero rows.
void check_softmax_scale(double softmax_scale);

// The backward's extra tensors: dout and out shaped, typed and placed like q, lse float32 of `lse_shape` on
// q's device; all contiguous. (q/k/v are check_qkv's.)
void check_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse,
                    at::IntArrayRef lse_shape);

}  // namespace cm3leon::attention
