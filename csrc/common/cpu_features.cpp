#include "common/cpu_features.h"

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define CM3LEON_X86 1
#endif

namespace cm3leon {
namespace {

#if CM3LEON_X86
uint64_t xcr0() {  // which register states the OS saves on context switches
  uint32_t lo = 0, hi = 0;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

// Linux hands out the AMX tile state only to processes that ask (arch_prctl ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); without the grant the first tile instruction faults.
bool amx_permitted() {
#if defined(__linux__) && defined(SYS_arch_prctl)
  constexpr int kReqXcompPerm = 0x1023, kXtileData = 18;
  return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
#else
  return false;
#endif
}

CpuFeatures query_cpu() {
  CpuFeatures f;
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28);
  if (!osxsave || !avx) return f;
  const uint64_t xcr = xcr0();
  const bool ymm = (xcr & 0x6) == 0x6;           // SSE + AVX state
  const bool zmm = ymm && (xcr & 0xe0) == 0xe0;  // opmask + upper ZMM state
  const bool tiles = (xcr & 0x60000) == 0x60000; // AMX tile config + data
  f.fma = ymm && (c & (1u << 12));
  f.f16c = ymm && (c & (1u << 29));
  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const unsigned max_sub7 = a;
  f.avx2 = ymm && (b & (1u << 5));
  f.avx512f = zmm && (b & (1u << 16));
  f.avx512dq = zmm && (b & (1u << 17));
  f.avx512bw = zmm && (b & (1u << 30));
  f.avx512vl = zmm && (b & (1u << 31));
  f.amx_bf16 = tiles && (d & (1u << 22)) && (d & (1u << 24)) && amx_permitted();
  if (max_sub7 >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    f.avx512_bf16 = zmm && (a & (1u << 5));
  }
  return f;
}
#else
CpuFeatures query_cpu() { return {}; }
#endif

constexpr Isa kLevels[] = {Isa::Baseline, Isa::Avx2, Isa::Avx512, Isa::Avx512Bf16, Isa::AmxBf16};

Isa select(const std::string& name) {
  const CpuFeatures& cpu = detected_cpu_features();
  if (name.empty()) {
    Isa best = Isa::Baseline;
    for (Isa isa : kLevels)
      if (int(isa) <= CM3LEON_MAX_ISA_LEVEL && isa_supported(isa, cpu)) best = isa;
    return best;
  }
  for (Isa isa : kLevels) {
    if (name != isa_name(isa)) continue;
    std::string missing;
    if (int(isa) > CM3LEON_MAX_ISA_LEVEL)
      throw std::invalid_argument("CM3LEON_CPU_ISA=" + name + ": this build compiled the CPU kernels only up to " +
                                  isa_name(Isa(CM3LEON_MAX_ISA_LEVEL)));
    if (!isa_supported(isa, cpu, &missing))
      throw std::invalid_argument("CM3LEON_CPU_ISA=" + name + ": this CPU lacks " + missing);
    return isa;
  }
  throw std::invalid_argument(
      "CM3LEON_CPU_ISA must be one of baseline, avx2, avx512, avx512_bf16, amx_bf16; got '" + name + "'");
}

std::string env_isa() {
  const char* v = std::getenv("CM3LEON_CPU_ISA");
  return v ? std::string(v) : std::string();
}

std::atomic<int> g_active{-1};  // -1: not chosen yet

}  // namespace

const CpuFeatures& detected_cpu_features() {
  static const CpuFeatures features = query_cpu();
  return features;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Baseline: return "baseline";
    case Isa::Avx2: return "avx2";
    case Isa::Avx512: return "avx512";
    case Isa::Avx512Bf16: return "avx512_bf16";
    case Isa::AmxBf16: return "amx_bf16";
  }
  return "unknown";
}

bool isa_supported(Isa isa, const CpuFeatures& cpu, std::string* missing) {
#if defined(CM3LEON_EMULATED_ISA)
  // A test build whose AVX-512 and AMX levels are AVX2 emulations (CMake's CM3LEON_EMULATE_ISA): they need
  // what the avx2 level needs.
  if (int(isa) > int(Isa::Avx2)) return isa_supported(Isa::Avx2, cpu, missing);
#endif
  std::string lacks;
  auto need = [&](bool has, const char* what) {
    if (!has) lacks += lacks.empty() ? what : std::string(", ") + what;
  };
  if (int(isa) >= int(Isa::Avx2)) { need(cpu.avx2, "avx2"); need(cpu.fma, "fma"); need(cpu.f16c, "f16c"); }
  if (int(isa) >= int(Isa::Avx512)) {
    need(cpu.avx512f, "avx512f"); need(cpu.avx512dq, "avx512dq");
    need(cpu.avx512bw, "avx512bw"); need(cpu.avx512vl, "avx512vl");
  }
  if (int(isa) >= int(Isa::Avx512Bf16)) need(cpu.avx512_bf16, "avx512_bf16");
  if (int(isa) >= int(Isa::AmxBf16)) need(cpu.amx_bf16, "amx_bf16 (with the OS's permission for tile data)");
  if (missing) *missing = lacks;
  return lacks.empty();
}

Isa active_isa() {
  int level = g_active.load(std::memory_order_acquire);
  if (level < 0) {
    level = int(select(env_isa()));
    g_active.store(level, std::memory_order_release);
  }
  return Isa(level);
}

void force_active_isa(const std::string& name) {
  g_active.store(int(select(name)), std::memory_order_release);
}

}  // namespace cm3leon
