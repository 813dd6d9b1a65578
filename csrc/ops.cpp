// The only file that knows every op: TORCH_LIBRARY schemas, their CPU/CUDA implementations, and the
// pybind11 module that makes cm3leon_kernels._C importable. Argument checking and autograd live in Python
// (cm3leon_kernels/*.py); kernels live in csrc/<family>/.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "common/cpu_features.h"
#include "vq/vq_launch.h"

TORCH_LIBRARY(cm3leon, m) {
  // VQ codebook lookup (cm3leon_kernels/vq.py). z is [N, D]; the Python wrapper flattens leading dims.
  m.def("vq_nearest(Tensor z, Tensor codebook, str metric='l2') -> (Tensor indices, Tensor distance)");
  m.def("vq_embed(Tensor indices, Tensor codebook) -> Tensor");
}

TORCH_LIBRARY_IMPL(cm3leon, CPU, m) {
  m.impl("vq_nearest", &cm3leon::vq::nearest_cpu_launch);
  m.impl("vq_embed", &cm3leon::vq::embed_cpu_launch);
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
