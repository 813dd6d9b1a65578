#include "common/cpu_features.h"

namespace cm3leon {

CpuFeatures compiled_cpu_features() {
  CpuFeatures f{false, false};
#if defined(__AVX2__) && defined(__FMA__)
  f.avx2_fma = true;
#endif
#if defined(__F16C__)
  f.f16c = true;
#endif
  return f;
}

}  // namespace cm3leon
