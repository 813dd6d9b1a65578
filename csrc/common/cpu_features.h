// Which SIMD paths the CPU kernels were compiled with (they are built with the kernels' own flags).
#pragma once

namespace cm3leon {

struct CpuFeatures {
  bool avx2_fma;
  bool f16c;
};

CpuFeatures compiled_cpu_features();

}  // namespace cm3leon
