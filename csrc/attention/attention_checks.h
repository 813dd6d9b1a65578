// Argument checks shared by the CPU and CUDA attention launchers (defined in attention_launch.cpp).
#pragma once
#include <ATen/core/Tensor.h>
#include <optional>

#include "attention/attention_dropout.h"

namespace cm3leon::attention {

// The trailing arguments of every forward/backward launcher, CPU and CUDA (schemas in ops.cpp, semantics in
// docs/attention.md).
#define CM3LEON_ATTN_EXTRA_PARAMS                                                                     \
  int64_t window_left, int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes, \
      bool deterministic, double dropout_p, const std::optional<at::Tensor>& dropout_seed

// Matching dtypes (float32/bf16/fp16) and devices, head counts (GQA), head dim (in [1, 256]),
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

// The FlashAttention extras: window_left/window_right >= -1, softcap finite (as float32) and >= 0,
// alibi_slopes float32, contiguous, on q's device, shaped [heads_q] or [batch, heads_q] (varlen: batch =
// documents). Returns the slopes' per-batch stride (0 when one row serves every batch row).
int64_t check_extras(const at::Tensor& q, int64_t batch, int64_t window_left, int64_t window_right,
                     double softcap, const std::optional<at::Tensor>& alibi_slopes);

// dropout_p finite and in [0, 1).
void check_dropout_p(double dropout_p);

// check_dropout_p, and for dropout_p > 0 the seed: one int64 on the CPU (drawn by the Python wrapper), with
// `streams` = segments * heads_q below 2^32 (a Philox counter word). Returns the mask's stream (threshold 0
// when dropout_p == 0, the seed then unread).
DropoutStream check_dropout(double dropout_p, const std::optional<at::Tensor>& dropout_seed, int64_t streams);

// cu_seqlens (either side): int32, 1-D with batch + 1 entries, on q's device, contiguous. Their values are
// the CPU launcher's to check (on CUDA that would need a host sync; the kernels clamp them instead).
void check_cu_seqlens(const at::Tensor& cu, const char* name, const at::Tensor& q);

// A tensor the CUDA kernels only read, on a 16-byte boundary (their vector loads): itself, or a copy when its
// data starts elsewhere (a view at an odd offset). Tensors written in place (the KV cache) must be aligned.
at::Tensor aligned16(const at::Tensor& t);

// What the CUDA forward/backward kernels lack: a head dim that is not a multiple of 8, dropout (a valid
// dropout_p > 0) and (for the backward, `deterministic_backward`) a fixed reduction order raise
// NotImplementedError naming the argument.
void check_cuda_support(const at::Tensor& q, bool deterministic_backward, double dropout_p = 0.0);

}  // namespace cm3leon::attention
