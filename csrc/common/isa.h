// Instruction-set levels of the CPU kernels. Every kernel body is compiled once per level in its own object
// with that level's compiler flags (CMakeLists.txt), and the level to run is chosen once at load time from
// cpuid (common/cpu_features.h). Torch-free, header-only.
//
// CM3LEON_ISA_LEVEL (set by CMake for kernel objects only) names the level a translation unit is compiled
// for. Every function with linkage in a header that kernel bodies include sits inside
// CM3LEON_ISA_BEGIN / CM3LEON_ISA_END: an inline namespace named after the level, so the AVX-512 copy of an
// inline helper (or of a kernel's internal function) is a different symbol from the AVX2 one and the linker
// can never hand one level's code to another. Plain types stay outside (they cross between levels).
#pragma once

#define CM3LEON_ISA_BASELINE 0
#define CM3LEON_ISA_AVX2 1
#define CM3LEON_ISA_AVX512 2
#define CM3LEON_ISA_AVX512_BF16 3
#define CM3LEON_ISA_AMX_BF16 4

#if !defined(CM3LEON_ISA_LEVEL)
#define CM3LEON_ISA_NAMESPACE host  // launchers, ops.cpp, the dispatcher: the build's default flags
#elif CM3LEON_ISA_LEVEL == CM3LEON_ISA_BASELINE
#define CM3LEON_ISA_NAMESPACE isa_baseline
#elif CM3LEON_ISA_LEVEL == CM3LEON_ISA_AVX2
#define CM3LEON_ISA_NAMESPACE isa_avx2
#elif CM3LEON_ISA_LEVEL == CM3LEON_ISA_AVX512
#define CM3LEON_ISA_NAMESPACE isa_avx512
#elif CM3LEON_ISA_LEVEL == CM3LEON_ISA_AVX512_BF16
#define CM3LEON_ISA_NAMESPACE isa_avx512_bf16
#elif CM3LEON_ISA_LEVEL == CM3LEON_ISA_AMX_BF16
#define CM3LEON_ISA_NAMESPACE isa_amx_bf16
#else
#error "unknown CM3LEON_ISA_LEVEL"
#endif

#define CM3LEON_ISA_BEGIN inline namespace CM3LEON_ISA_NAMESPACE {
#define CM3LEON_ISA_END }

namespace cm3leon {

// Ordered: a level's code may use every instruction of the levels below it.
enum class Isa : int {
  Baseline = CM3LEON_ISA_BASELINE,      // the compiler's default target (x86-64), scalar loops
  Avx2 = CM3LEON_ISA_AVX2,              // AVX2 + FMA + F16C
  Avx512 = CM3LEON_ISA_AVX512,          // + AVX-512 F/BW/VL/DQ
  Avx512Bf16 = CM3LEON_ISA_AVX512_BF16,  // + AVX-512 BF16 (vdpbf16ps)
  AmxBf16 = CM3LEON_ISA_AMX_BF16          // + AMX tiles with bf16 dot products (tdpbf16ps)
};

#if defined(CM3LEON_ISA_LEVEL)
constexpr Isa kIsa = Isa(CM3LEON_ISA_LEVEL);  // the level this kernel object is compiled for
#endif

}  // namespace cm3leon
