// The only file that knows every op: TORCH_LIBRARY schemas, their CPU/CUDA implementations, and the
// pybind11 module that makes cm3leon_kernels._C importable. Argument checking and autograd live in Python
// (cm3leon_kernels/*.py); kernels live in csrc/<family>/.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "common/cpu_features.h"
#include "attention/attention_launch.h"
#include "vq/vq_launch.h"

TORCH_LIBRARY(cm3leon, m) {
  // VQ codebook lookup (cm3leon_kernels/vq.py). z is [N, D]; the Python wrapper flattens leading dims.
  m.def("vq_nearest(Tensor z, Tensor codebook, str metric='l2') -> (Tensor indices, Tensor distance)");
  m.def("vq_embed(Tensor indices, Tensor codebook) -> Tensor");

  // ---- Attention (cm3leon_kernels/attention.py) -------------------------------------------------------
  // FlashAttention-compatible fused attention; lse is float32 [B, Hq, Sq] (varlen: [Hq, total_q]).
  m.def("flash_attn_forward(Tensor q, Tensor k, Tensor v, float softmax_scale, bool causal)"
        " -> (Tensor out, Tensor lse)");
  m.def("flash_attn_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " float softmax_scale, bool causal) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("flash_attn_varlen_forward(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k,"
        " int max_seqlen_q, int max_seqlen_k, float softmax_scale, bool causal) -> (Tensor out, Tensor lse)");
  m.def("flash_attn_varlen_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, float softmax_scale,"
        " bool causal) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Appends k/v into the caches in place (at cache_seqlens, or cache_seqlen for every row when it is None).
  m.def("flash_attn_kvcache(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? k, Tensor? v,"
        " Tensor? cache_seqlens, int cache_seqlen, float softmax_scale, bool causal)"
        " -> (Tensor out, Tensor lse)");
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
}

#ifdef CM3LEON_WITH_CUDA
TORCH_LIBRARY_IMPL(cm3leon, CUDA, m) {
  m.impl("vq_embed", &cm3leon::vq::embed_cuda_launch);
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

pybind11::dict cpu_features() {
  const cm3leon::CpuFeatures compiled = cm3leon::compiled_cpu_features();
  pybind11::dict f;
  f["avx2_fma"] = compiled.avx2_fma;
  f["f16c"] = compiled.f16c;
  return f;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "cm3leon_kernels native extension: ops are registered as torch.ops.cm3leon.*";
  m.def("cuda_built", &cuda_built, "Whether the CUDA kernels were compiled into this build.");
  m.def("cpu_features", &cpu_features, "SIMD features the CPU kernels were compiled for.");
}
