// Fused linear + cross-entropy on the CPU (torch-free). Contract and design: docs/loss.md.
#pragma once
#include <cstdint>

#include "common/cpu_features.h"
#include "common/dtype.h"

namespace cm3leon::loss {

enum class Reduction : int64_t { None = 0, Sum = 1, Mean = 2 };

struct LossConfig {
  int64_t tokens = 0, dim = 0, vocab = 0;  // hidden [tokens, dim], weight [vocab, dim]
  int64_t ignore_index = -100;
  float label_smoothing = 0.f;
  float z_loss = 0.f;
  float softcap = 0.f;  // 0: off; otherwise logits <- softcap * tanh(logits / softcap) before everything
};

// What went wrong with the data (shapes and dtypes are the launcher's job); `index` is the token.
struct LossStatus {
  enum Kind { Ok, TargetOutOfRange, BadWeight, NonFinite } kind = Ok;
  int64_t index = -1;
};

// Highest level with its own loss bodies (AVX-512: the 6 x 32 micro-kernel; avx512_bf16 and amx_bf16: bf16
// logits from bf16 pairs); one explicit specialisation per compiled level (loss_cpu.cpp). hidden/weight are
// of `dtype`, grad_hidden too.
constexpr Isa kLossMaxIsa = Isa::AmxBf16;
template <Isa I>
LossStatus forward_kernel(DType dtype, const void* hidden, const void* weight, const int64_t* targets,
                          const float* loss_weights, const LossConfig& cfg, Reduction reduction, float* loss,
                          float* lse, void* grad_hidden, float* grad_weight, int threads);
template <Isa I>
LossStatus backward_kernel(DType dtype, const void* hidden, const void* weight, const int64_t* targets,
                           const float* loss_weights, const LossConfig& cfg, const float* lse, const float* grad_loss,
                           void* grad_hidden, float* grad_weight, int threads);

// The entry points exist for host code only (launchers); kernel objects define the bodies above.
#if !defined(CM3LEON_ISA_LEVEL)
CM3LEON_ISA_BEGIN

// Per-token loss l_t = (1 - eps)(lse_t - z_t[y_t]) + eps (lse_t - mean_v z_t[v]) + z_loss * lse_t^2 over
// (soft-capped) logits z_t = hidden_t . weight^T; weighted by loss_weights (1 when null), 0 where
// targets == ignore_index. Writes lse [tokens] and loss: [tokens] w_t l_t (Reduction::None) or [1]
// (sum w_t l_t, divided by sum w_t over non-ignored tokens for Mean; 0 when that sum is 0).
// When grad_weight is not null (Sum/Mean only) also writes the gradients of that scalar: grad_hidden
// [tokens, dim] in the input dtype and grad_weight [vocab, dim] in fp32, computed from each chunk of logits
// while it is in memory (the matmul is not redone in a backward pass). Uses up to `threads` CPU threads.
inline LossStatus forward_cpu(DType dtype, const void* hidden, const void* weight, const int64_t* targets,
                              const float* loss_weights, const LossConfig& cfg, Reduction reduction, float* loss,
                              float* lse, void* grad_hidden, float* grad_weight, int threads) {
  return dispatch_isa<kLossMaxIsa>([&](auto isa) {
    return forward_kernel<decltype(isa)::value>(dtype, hidden, weight, targets, loss_weights, cfg, reduction, loss,
                                                lse, grad_hidden, grad_weight, threads);
  });
}

// Gradients of sum_t grad_loss[t] * w_t * l_t given the forward's lse: recomputes the logits chunk by chunk
// and turns each block into its gradient contribution at once (one matmul pass, no log-sum-exp pass).
inline LossStatus backward_cpu(DType dtype, const void* hidden, const void* weight, const int64_t* targets,
                               const float* loss_weights, const LossConfig& cfg, const float* lse,
                               const float* grad_loss, void* grad_hidden, float* grad_weight, int threads) {
  return dispatch_isa<kLossMaxIsa>([&](auto isa) {
    return backward_kernel<decltype(isa)::value>(dtype, hidden, weight, targets, loss_weights, cfg, lse, grad_loss,
                                                 grad_hidden, grad_weight, threads);
  });
}

CM3LEON_ISA_END
#endif

}  // namespace cm3leon::loss
