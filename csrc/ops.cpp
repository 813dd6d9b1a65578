// The only file that knows every op: TORCH_LIBRARY schemas, their CPU/CUDA implementations, and the
// pybind11 module that makes cm3leon_kernels._C importable. Argument checking and autograd live in Python
// (cm3leon_kernels/*.py); kernels live in csrc/<family>/.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include "common/cpu_features.h"
#include "attention/attention_cpu.h"
#include "sampling/sampling_cpu.h"
#include "vq/vq_cpu.h"
#include "attention/attention_launch.h"
#include "common/philox.h"
#include "loss/loss_launch.h"
#include "sampling/sampling_launch.h"
#include "vq/vq_launch.h"

TORCH_LIBRARY(cm3leon, m) {
  // VQ codebook lookup (cm3leon_kernels/vq.py). z is [N, D]; the Python wrapper flattens leading dims.
  m.def("vq_nearest(Tensor z, Tensor codebook, str metric='l2') -> (Tensor indices, Tensor distance)");
  m.def("vq_embed(Tensor indices, Tensor codebook) -> Tensor");

  // ---- Attention (cm3leon_kernels/attention.py) -------------------------------------------------------
  // FlashAttention-compatible fused attention; lse is float32 [B, Hq, Sq] (varlen: [Hq, total_q]).
  // The trailing arguments (FlashAttention 2.8): local window (-1 = unbounded side), tanh softcap (0 = off),
  // ALiBi slopes float32 [Hq] or [B, Hq], and `deterministic`, which the forward ops only carry for autograd;
  // then dropout: probability dropout_p in [0, 1) and, when it is > 0, dropout_seed (one int64 on the CPU)
  // keying the Philox mask (csrc/attention/attention_dropout.h) that the backward regenerates.
  m.def("flash_attn_forward(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal,"
        " int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None,"
        " bool deterministic=False, float dropout_p=0.0, Tensor? dropout_seed=None)"
        " -> (Tensor out, Tensor lse)");
  m.def("flash_attn_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " float softmax_scale, bool causal, int window_left=-1, int window_right=-1, float softcap=0.0,"
        " Tensor? alibi_slopes=None, bool deterministic=False, float dropout_p=0.0, Tensor? dropout_seed=None)"
        " -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("flash_attn_varlen_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k,"
        " int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal, int window_left=-1,"
        " int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None, bool deterministic=False,"
        " float dropout_p=0.0, Tensor? dropout_seed=None) -> (Tensor out, Tensor lse)");
  m.def("flash_attn_varlen_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale,"
        " bool causal, int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None,"
        " bool deterministic=False, float dropout_p=0.0, Tensor? dropout_seed=None)"
        " -> (Tensor dq, Tensor dk, Tensor dv)");
  // The forward's keep mask, bool [batch, nheads, seqlen_q, seqlen_k] (varlen: documents and their maximum
  // lengths, each document top-left): for tests and for S_dmask (return_attn_probs).
  m.def("flash_attn_dropout_mask(Tensor dropout_seed, int batch, int nheads, int seqlen_q, int seqlen_k,"
        " float dropout_p) -> Tensor");
  // Appends k/v into the caches in place (at cache_seqlens, or cache_seqlen for every row when it is None).
  m.def("flash_attn_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v,"
        " Tensor? cache_seqlens, int cache_seqlen, float softmax_scale, bool causal,"
        " int window_left=-1, int window_right=-1, float softcap=0.0, Tensor? alibi_slopes=None,"
        " Tensor? rotary_cos=None, Tensor? rotary_sin=None, bool rotary_interleaved=True,"
        " Tensor? cache_batch_idx=None, Tensor? cache_leftpad=None, Tensor? block_table=None,"
        " int num_splits=0) -> (Tensor out, Tensor lse)");

  // ---- Sampling (cm3leon_kernels/sampling.py) -------------------------------------------------------
  // Both return (tokens int64 [B], logprobs float32 [B]). The vocabulary restriction is [range_lo, range_hi)
  // intersected with allowed_mask; randomness is Philox keyed by `seed` (or the per-row `seeds` tensor) and
  // `step` (or `step_tensor`), see csrc/common/philox.h.
  m.def("cfg_sample(Tensor logits, float[] guidance_scale, float temperature, int top_k, float top_p, "
        "float min_p, int range_lo, int range_hi, Tensor? allowed_mask, int seed, Tensor? seeds, int step, "
        "Tensor? step_tensor) -> (Tensor tokens, Tensor logprobs)");
  m.def("contrastive_sample(Tensor expert_logits, Tensor amateur_logits, float alpha, int k, float temperature, "
        "float amateur_temperature, int range_lo, int range_hi, Tensor? allowed_mask, int seed, Tensor? seeds, "
        "int step, Tensor? step_tensor) -> (Tensor tokens, Tensor logprobs)");

  // ---- Fused linear + cross-entropy (cm3leon_kernels/loss.py) ------------------------------------------
  // reduction: 0 none (loss [T]), 1 sum, 2 mean (loss []); softcap 0 = off. With compute_grad (sum/mean) the
  // forward also returns the gradients of the reduced loss; otherwise they are empty [0] tensors.
  m.def("linear_cross_entropy_forward(Tensor hidden, Tensor weight, Tensor targets, Tensor? loss_weights, "
        "int ignore_index, float label_smoothing, float z_loss, float softcap, int reduction, bool compute_grad)"
        " -> (Tensor loss, Tensor lse, Tensor grad_hidden, Tensor grad_weight)");
  m.def("linear_cross_entropy_backward(Tensor grad_loss, Tensor hidden, Tensor weight, Tensor targets, "
        "Tensor? loss_weights, Tensor lse, int ignore_index, float label_smoothing, float z_loss, float softcap)"
        " -> (Tensor grad_hidden, Tensor grad_weight)");
}

TORCH_LIBRARY_IMPL(cm3leon, CPU, m) {
  m.impl("vq_nearest", &cm3leon::vq::nearest_cpu_launch);
  m.impl("vq_embed", &cm3leon::vq::embed_cpu_launch);
  // Attention
  m.impl("flash_attn_forward", &cm3leon::attention::forward_cpu_launch);
  m.impl("flash_attn_backward", &cm3leon::attention::backward_cpu_launch);
  m.impl("flash_attn_varlen_forward", &cm3leon::attention::varlen_forward_cpu_launch);
  m.impl("flash_attn_varlen_backward", &cm3leon::attention::varlen_backward_cpu_launch);
  m.impl("flash_attn_kvcache", &cm3leon::attention::kvcache_cpu_launch);
  m.impl("flash_attn_dropout_mask", &cm3leon::attention::dropout_mask_cpu_launch);
  // Sampling
  m.impl("cfg_sample", &cm3leon::sampling::cfg_sample_cpu_launch);
  m.impl("contrastive_sample", &cm3leon::sampling::contrastive_sample_cpu_launch);
  // Fused linear + cross-entropy
  m.impl("linear_cross_entropy_forward", &cm3leon::loss::forward_cpu_launch);
  m.impl("linear_cross_entropy_backward", &cm3leon::loss::backward_cpu_launch);
}

// Ops without a derivative: backward() through them raises "derivative ... is not implemented" instead of
// PyTorch's default for custom ops (a warning and silently missing gradients). flash_attn_kvcache is
// documented as not differentiable (and, mutating its caches, cannot take a Python autograd formula); the
// attention backward ops have no derivative, so double backward must fail loudly too.
TORCH_LIBRARY_IMPL(cm3leon, Autograd, m) {
  m.impl("flash_attn_kvcache", torch::autograd::autogradNotImplementedFallback());
  m.impl("flash_attn_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("flash_attn_varlen_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("linear_cross_entropy_backward", torch::autograd::autogradNotImplementedFallback());
}

#ifdef CM3LEON_WITH_CUDA
TORCH_LIBRARY_IMPL(cm3leon, CUDA, m) {
  m.impl("vq_nearest", &cm3leon::vq::nearest_cuda_launch);
  m.impl("vq_embed", &cm3leon::vq::embed_cuda_launch);
  // Sampling (csrc/sampling/sampling_cuda_launch.cpp)
  m.impl("cfg_sample", &cm3leon::sampling::cfg_sample_cuda_launch);
  m.impl("contrastive_sample", &cm3leon::sampling::contrastive_sample_cuda_launch);
  // Attention backward (csrc/attention/attention_backward_cuda*)
  m.impl("flash_attn_backward", &cm3leon::attention::backward_cuda_launch);
  m.impl("flash_attn_varlen_backward", &cm3leon::attention::varlen_backward_cuda_launch);
  // Attention forward and KV cache (csrc/attention/attention_cuda_launch.cpp)
  m.impl("flash_attn_forward", &cm3leon::attention::forward_cuda_launch);
  m.impl("flash_attn_varlen_forward", &cm3leon::attention::varlen_forward_cuda_launch);
  m.impl("flash_attn_kvcache", &cm3leon::attention::kvcache_cuda_launch);
  // Fused linear + cross-entropy (csrc/loss/loss_cuda*)
  m.impl("linear_cross_entropy_forward", &cm3leon::loss::forward_cuda_launch);
  m.impl("linear_cross_entropy_backward", &cm3leon::loss::backward_cuda_launch);
}
#endif

namespace {
bool cuda_built() {
#ifdef CM3LEON_WITH_CUDA
  return true;
#else
  return false;
#endif
}

// The CPU as cpuid reports it, the levels this build compiled, the level chosen and the one each op runs at.
pybind11::dict cpu_features() {
  using cm3leon::Isa;
  const cm3leon::CpuFeatures& cpu = cm3leon::detected_cpu_features();
  pybind11::dict seen;
  seen["avx2"] = cpu.avx2; seen["fma"] = cpu.fma; seen["f16c"] = cpu.f16c;
  seen["avx512f"] = cpu.avx512f; seen["avx512dq"] = cpu.avx512dq; seen["avx512bw"] = cpu.avx512bw;
  seen["avx512vl"] = cpu.avx512vl; seen["avx512_bf16"] = cpu.avx512_bf16; seen["amx_bf16"] = cpu.amx_bf16;
  pybind11::list compiled, supported;
  for (Isa isa : {Isa::Baseline, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::AmxBf16}) {
    if (int(isa) <= CM3LEON_MAX_ISA_LEVEL) compiled.append(cm3leon::isa_name(isa));
    if (int(isa) <= CM3LEON_MAX_ISA_LEVEL && cm3leon::isa_supported(isa, cpu)) supported.append(cm3leon::isa_name(isa));
  }
  auto path = [](Isa highest) { return cm3leon::isa_name(cm3leon::family_isa(highest)); };
  pybind11::dict ops;
  for (const char* op : {"flash_attn_forward", "flash_attn_backward", "flash_attn_varlen_forward",
                         "flash_attn_varlen_backward", "flash_attn_kvcache"})
    ops[op] = path(cm3leon::attention::kAttentionMaxIsa);
  for (const char* op : {"vq_nearest", "vq_embed"}) ops[op] = path(cm3leon::vq::kVqMaxIsa);
  for (const char* op : {"cfg_sample", "contrastive_sample"}) ops[op] = path(cm3leon::sampling::kSamplingMaxIsa);
  for (const char* op : {"linear_cross_entropy_forward", "linear_cross_entropy_backward"})
    ops[op] = path(cm3leon::loss::kLossMaxIsa);
  pybind11::dict f;
  f["cpu"] = seen;
  f["compiled"] = compiled;
  f["supported"] = supported;
  f["isa"] = cm3leon::isa_name(cm3leon::active_isa());
  f["ops"] = ops;
#if defined(CM3LEON_EMULATED_ISA)
  f["emulated"] = true;  // a test build: the AVX-512 and AMX levels are AVX2 emulations
#else
  f["emulated"] = false;
#endif
  return f;
}

void force_cpu_isa(const std::string& name) { cm3leon::force_active_isa(name); }
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cm3leon_kernels native extension: ops are registered as torch.ops.cm3leon.*";
  m.def("cuda_built", &cuda_built, "Whether the CUDA kernels were compiled into this build.");
  m.def("cpu_features", &cpu_features, "CPU features seen, CPU kernel levels compiled and chosen, each op's level.");
  m.def("_force_cpu_isa", &force_cpu_isa, "Tests only: re-select the CPU kernel level as CM3LEON_CPU_ISA=name would.");
  // Sampling: the Philox stream, exposed so tests can check known-answer vectors and recompute draws.
  m.def("philox4x32_10", [](std::array<uint32_t, 4> counter, uint32_t key0, uint32_t key1) {
    const cm3leon::Philox4x32 out = cm3leon::philox4x32_10({{counter[0], counter[1], counter[2], counter[3]}}, key0, key1);
    return std::array<uint32_t, 4>{out.v[0], out.v[1], out.v[2], out.v[3]};
  }, "Philox4x32-10 of a counter (4 x uint32) under a key (2 x uint32).");
  m.def("philox_uniform", [](uint64_t seed, uint32_t row, uint64_t step) {
    return cm3leon::philox_uniform(seed, row, step);
  }, "The sampling uniform in [0, 1) of stream (seed, row, step).");
}
