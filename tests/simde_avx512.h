// Forced include (-include) for compiling an AVX-512 kernel level on a CPU without AVX-512, for
// tests/isa_oracle.cpp: the host's own intrinsics first, then SIMDe's portable implementations of the AVX-512
// intrinsics under their usual names, then the feature macros the kernel sources test (by the level being built). The objects contain no
// AVX-512 instruction; they run the AVX-512 bodies' logic (16 lanes, mask registers, the 6 x 32 tile) on AVX2.
#pragma once
#include <immintrin.h>
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#define __AVX512F__ 1
#define __AVX512DQ__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#if CM3LEON_ISA_LEVEL >= 3
#define __AVX512BF16__ 1
#endif
