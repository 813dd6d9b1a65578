// What the CPU offers, which instruction-set level the kernels run at, and the dispatch from a kernel
// family's entry point to the body compiled for that level. Torch-free; compiled once, with the build's
// default flags (it must run on any x86-64 CPU, and on other architectures where only the baseline exists).
#pragma once
#include <algorithm>
#include <string>
#include <type_traits>

#include "common/isa.h"

#ifndef CM3LEON_MAX_ISA_LEVEL  // the highest level this build compiled (CMake defines it target-wide)
#define CM3LEON_MAX_ISA_LEVEL CM3LEON_ISA_BASELINE
#endif

namespace cm3leon {

// Features as cpuid reports them, each also requiring the OS to save the registers it uses (XCR0).
struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512dq = false, avx512bw = false, avx512vl = false, avx512_bf16 = false;
  bool amx_bf16 = false;
};

const CpuFeatures& detected_cpu_features();

const char* isa_name(Isa isa);

// Whether this CPU runs every instruction of `isa`; otherwise fills `missing` with the features it lacks.
bool isa_supported(Isa isa, const CpuFeatures& cpu, std::string* missing = nullptr);

// The level the kernels run at: CM3LEON_CPU_ISA (baseline|avx2|avx512|avx512_bf16|amx_bf16) when set, else the
// highest level that is both compiled and supported. Chosen on first use; an unknown name, a level this CPU
// lacks, or one the build did not compile throws std::invalid_argument naming the problem.
Isa active_isa();

// Re-selects the level as if CM3LEON_CPU_ISA were `name` (empty: unset), with the same checks. Tests only:
// callers must not race it with running kernels.
void force_active_isa(const std::string& name);

// The level a kernel family whose bodies go up to `highest` runs at.
inline Isa family_isa(Isa highest) {
  return Isa(std::min({int(active_isa()), int(highest), CM3LEON_MAX_ISA_LEVEL}));
}

namespace isa_detail {
template <int L, typename F>
decltype(auto) dispatch_from(int level, F&& f) {
  if constexpr (L > CM3LEON_ISA_BASELINE) {
    if (level < L) return dispatch_from<L - 1>(level, f);
  }
  return f(std::integral_constant<Isa, Isa(L)>{});
}
}  // namespace isa_detail

// Calls f(std::integral_constant<Isa, level>{}) for the level of a family whose bodies go up to `Highest`.
// A family must be compiled for every level from baseline up to min(Highest, CM3LEON_MAX_ISA_LEVEL).
template <Isa Highest, typename F>
decltype(auto) dispatch_isa(F&& f) {
  constexpr int top = std::min(int(Highest), CM3LEON_MAX_ISA_LEVEL);
  return isa_detail::dispatch_from<top>(std::min(int(family_isa(Highest)), top), f);
}

}  // namespace cm3leon
