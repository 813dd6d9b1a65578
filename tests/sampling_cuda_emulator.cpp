// Runs the CUDA sampling kernel bodies (csrc/sampling/sampling_cuda_{cfg,contrastive}.cuh) on the CPU and
// compares every token with the CPU kernel: a check of the kernel logic on machines without a GPU. Built and
// run by tests/test_sampling_cuda_emulated.py.
//
// Emulation: one block's 1024 threads are cooperative fibers (ucontext) on one OS thread; __syncthreads and
// the warp intrinsics are barriers at which a fiber yields until its block (or warp) has arrived. Fibers run
// in thread order between barriers, so this checks the arithmetic, the indexing and the barrier structure
// (a thread running ahead to its next barrier overwrites shared state others have not read yet), not every
// interleaving a GPU can produce. With a third argument 1 the kernel bodies run with x86 FTZ/DAZ (subnormal
// operands and results of float operations read as zero), as nvcc's --ftz=true (implied by --use_fast_math)
// makes the GPU run them.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <ucontext.h>
#include <xmmintrin.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

// Device-code spellings on the host.
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline

namespace emu {

constexpr int kThreads = 1024;
struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  int or_phase = 0;
};
std::vector<Fiber> fibers(kThreads);
ucontext_t scheduler;
int current = 0;

struct Barrier {
  int arrived = 0, expected = 0;
  unsigned long long generation = 0;
  void wait() {
    const unsigned long long g = generation;
    if (++arrived == expected) {
      arrived = 0;
      ++generation;
      return;
    }
    while (generation == g) swapcontext(&fibers[current].ctx, &scheduler);
  }
};
Barrier block_barrier{0, kThreads, 0};
Barrier warp_barrier[32];
unsigned long long exchange[32][32];
int or_slot[2];

}  // namespace emu

struct EmuIdx {
  unsigned x, y, z;
};
EmuIdx emu_thread_idx;
#define threadIdx emu_thread_idx

inline void __syncthreads() { emu::block_barrier.wait(); }
inline int __syncthreads_or(int pred) {
  emu::Fiber& f = emu::fibers[emu::current];
  const int ph = f.or_phase;
  f.or_phase ^= 1;
  if (pred) emu::or_slot[ph] = 1;
  __syncthreads();
  const int v = emu::or_slot[ph];
  __syncthreads();
  if (threadIdx.x == 0) emu::or_slot[ph] = 0;
  return v;
}
// Every lane publishes a value, then reads lane `src`'s.
template <class T>
T warp_read(T v, int src) {
  const int w = int(threadIdx.x) / 32, l = int(threadIdx.x) % 32;
  unsigned long long raw = 0;
  std::memcpy(&raw, &v, sizeof v);
  emu::exchange[w][l] = raw;
  emu::warp_barrier[w].wait();
  T out;
  std::memcpy(&out, &emu::exchange[w][src], sizeof out);
  emu::warp_barrier[w].wait();
  return out;
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int o) { return warp_read(v, (int(threadIdx.x) % 32) ^ o); }
template <class T>
T __shfl_up_sync(unsigned, T v, int o) {
  const int l = int(threadIdx.x) % 32;
  return warp_read(v, l >= o ? l - o : l);
}
template <class T>
T __shfl_sync(unsigned, T v, int src) { return warp_read(v, src); }
// Lanes whose published value satisfies `same`, as a bit mask.
template <class Pred>
unsigned warp_mask(unsigned long long v, Pred same) {
  const int w = int(threadIdx.x) / 32, l = int(threadIdx.x) % 32;
  emu::exchange[w][l] = v;
  emu::warp_barrier[w].wait();
  unsigned bits = 0;
  for (int i = 0; i < 32; ++i) bits |= unsigned(same(emu::exchange[w][i])) << i;
  emu::warp_barrier[w].wait();
  return bits;
}
inline unsigned __ballot_sync(unsigned, int pred) {
  return warp_mask(pred != 0, [](unsigned long long x) { return x != 0; });
}
inline unsigned __match_any_sync(unsigned, unsigned v) {
  return warp_mask(v, [v](unsigned long long x) { return x == v; });
}
// One fiber runs at a time: plain read-modify-writes are atomic.
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
  const auto o = *a;
  *a += v;
  return o;
}
inline int atomicAdd(int* a, int v) { const int o = *a; *a += v; return o; }
inline long long atomicMin(long long* a, long long v) { const long long o = *a; *a = std::min(o, v); return o; }
template <class T>
T __ldg(const T* p) { return *p; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __uint_as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned long long __float2ull_rn(float x) { return (unsigned long long)std::nearbyint(double(x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }

#include "sampling/sampling_cpu.h"
#include "sampling/sampling_cuda_cfg.cuh"
#include "sampling/sampling_cuda_contrastive.cuh"

using namespace cm3leon;
using namespace cm3leon::sampling;

namespace {

bool emulate_ftz = false;
cuda::Shared shared_memory;
void (*row_body)(float*, cuda::Shared&);
std::vector<float> row_cache;

void fiber_main() {
  row_body(row_cache.data(), shared_memory);
  emu::fibers[emu::current].done = true;
}

// Runs body(cache, shared) as one block of 1024 threads.
template <class Body>
void run_block(int64_t cached, Body body) {
  static Body* current_body;
  current_body = &body;
  row_body = [](float* c, cuda::Shared& s) { (*current_body)(c, s); };
  row_cache.assign(size_t(std::max<int64_t>(cached, 1)), std::nanf(""));
  std::memset(&shared_memory, 0xCD, sizeof shared_memory);  // garbage, like uninitialised shared memory
  const unsigned csr = _mm_getcsr();
  if (emulate_ftz) _mm_setcsr(csr | 0x8040u);  // FTZ | DAZ; the fibers' contexts below inherit it
  for (auto& w : emu::warp_barrier) w = {0, 32, 0};
  emu::block_barrier = {0, emu::kThreads, 0};
  for (int t = 0; t < emu::kThreads; ++t) {
    emu::Fiber& f = emu::fibers[t];
    f.done = false;
    f.or_phase = 0;
    f.stack.resize(256 * 1024);
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &emu::scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
  for (bool busy = true; busy;) {
    busy = false;
    for (int t = 0; t < emu::kThreads; ++t) {
      if (emu::fibers[t].done) continue;
      busy = true;
      emu::current = t;
      emu_thread_idx = {unsigned(t), 0u, 0u};
      swapcontext(&emu::scheduler, &emu::fibers[t].ctx);
    }
  }
  _mm_setcsr(csr);
}

struct Case {
  bool contrastive;
  int64_t batch, streams, vocab, lo, hi, top_k, k, cache_limit;
  float temperature;
  double top_p, min_p, alpha;
  int mask;  // 0 none, 1 [V], 2 [B, V]
  bool integer_logits;
  int subnormal_streams = 0;  // the first this many streams hold fp32-subnormal logits
};

template <typename T>
T from(float f) { T t; from_float(f, &t); return t; }

// Samples one random case with both kernels; returns the number of rows where they disagree.
template <typename T>
int run_case(const Case& c, std::mt19937_64& rng) {
  std::normal_distribution<float> normal(0.f, 2.f);
  const int64_t S = c.contrastive ? 2 : c.streams;
  std::vector<T> x(size_t(c.batch * S * c.vocab));
  for (size_t j = 0; j < x.size(); ++j) {
    const float f = c.integer_logits ? std::round(normal(rng)) : normal(rng);
    // Subnormal logits: multiples of 2^-133 below 2^-126 (exact in fp32 and bf16).
    const bool subnormal = int64_t(j) / c.vocab % S < c.subnormal_streams;
    x[j] = from<T>(subnormal ? std::ldexp(std::round(4.f * f), -133) : f);
  }
  std::vector<uint8_t> mask_bytes;
  Vocab allowed{c.lo, c.hi, nullptr, 0};
  if (c.mask) {
    const int64_t rows = c.mask == 2 ? c.batch : 1;
    mask_bytes.resize(size_t(rows * c.vocab));
    std::bernoulli_distribution keep(0.7);
    for (auto& m : mask_bytes) m = keep(rng);
    for (int64_t r = 0; r < rows; ++r) mask_bytes[size_t(r * c.vocab + c.lo)] = 1;  // no empty row
    allowed.mask = reinterpret_cast<const bool*>(mask_bytes.data());
    allowed.mask_row_stride = c.mask == 2 ? c.vocab : 0;
  }
  const int64_t seed = int64_t(rng() >> 1);
  const uint64_t step = rng() % 1000;
  std::vector<int64_t> cpu_tokens(size_t(c.batch)), gpu_tokens(size_t(c.batch));
  std::vector<float> cpu_logprobs(size_t(c.batch)), gpu_logprobs(size_t(c.batch));
  long long status = LLONG_MAX;
  const cuda::Outputs out{gpu_tokens.data(), gpu_logprobs.data(), &status};
  const DType dtype = std::is_same_v<T, float> ? DType::Float32 : std::is_same_v<T, bf16> ? DType::BFloat16
                                                                                        : DType::Float16;
  const SeedSpec host_seeds{nullptr, seed, step};
  const DeviceSeeds device_seeds{nullptr, seed, step, nullptr};
  RowError cpu_error;
  if (!c.contrastive) {
    const CfgOptions o{c.streams, 2.5f, 1.5f, c.temperature, c.top_k, c.top_p, c.min_p};
    cpu_error = cfg_sample_cpu(dtype, x.data(), c.batch, S * c.vocab, c.vocab, o, allowed, host_seeds,
                               cpu_tokens.data(), cpu_logprobs.data(), /*threads=*/1);
    auto p = cuda::make_cfg_params<T>(x.data(), S * c.vocab, c.vocab, o, c.min_p > 0 ? std::log(c.min_p) : 0.0,
                                      allowed, device_seeds, out);
    p.cached = std::min(p.cached, c.cache_limit);
    for (int64_t r = 0; r < c.batch; ++r)
      run_block(p.cached, [&](float* cache, cuda::Shared& sh) { cuda::sample_row(p, r, cache, sh); });
  } else {
    const ContrastiveOptions o{c.alpha, c.k, c.temperature, 0.7f};
    cpu_error = contrastive_sample_cpu(dtype, x.data(), x.data() + c.vocab, c.batch, 2 * c.vocab, 2 * c.vocab, o,
                                       allowed, host_seeds, cpu_tokens.data(), cpu_logprobs.data(), /*threads=*/1);
    auto p = cuda::make_contrastive_params<T>(x.data(), x.data() + c.vocab, 2 * c.vocab, 2 * c.vocab, o,
                                              c.alpha > 0 ? std::log(c.alpha) : 0.0, allowed, device_seeds, out);
    p.cached = std::min(p.cached, c.cache_limit);
    for (int64_t r = 0; r < c.batch; ++r)
      run_block(p.cached, [&](float* cache, cuda::Shared& sh) { cuda::sample_row(p, r, cache, sh); });
  }
  if (cpu_error.row >= 0 || status != LLONG_MAX) {
    std::printf("  error: cpu row %lld, emulated status %lld\n", (long long)cpu_error.row, status);
    return 1;
  }
  int bad = 0;
  for (size_t r = 0; r < cpu_tokens.size(); ++r) {
    if (cpu_tokens[r] != gpu_tokens[r] || !(std::fabs(cpu_logprobs[r] - gpu_logprobs[r]) <= 1e-5f)) {
      std::printf("  row %zu: cpu %lld (logprob %g), emulated %lld (%g)\n", r, (long long)cpu_tokens[r],
                  cpu_logprobs[r], (long long)gpu_tokens[r], gpu_logprobs[r]);
      ++bad;
    }
  }
  return bad;
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? std::atoi(argv[1]) : 20;
  std::mt19937_64 rng(argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1);
  emulate_ftz = argc > 3 && std::atoi(argv[3]) == 1;
  auto pick = [&](std::initializer_list<int64_t> v) { return *(v.begin() + rng() % v.size()); };
  int mismatches = 0;
  for (int i = 0; i < cases; ++i) {
    Case c;
    c.contrastive = rng() % 3 == 0;
    c.batch = pick({1, 2, 3});
    c.vocab = pick({1, 5, 33, 101, 1000, 3001, 9000});
    c.streams = pick({1, 2, 3});
    c.lo = c.vocab > 3 ? pick({0, 0, 1, 3}) : 0;  // odd starts take the scalar loads
    c.hi = c.vocab - (c.vocab - 1 > c.lo ? pick({0, 0, 1}) : 0);
    c.temperature = float(pick({0, 7, 10, 13})) / 10.f;
    c.top_k = std::min<int64_t>(pick({0, 0, 1, 5, 50, 5000}), c.vocab);  // 5000: more than the candidate buffer
    c.top_p = double(pick({100, 100, 50, 90, 99})) / 100.0;
    c.min_p = double(pick({0, 0, 5})) / 100.0;
    c.k = std::min<int64_t>(pick({1, 2, 5, 300}), c.vocab);
    c.alpha = double(pick({0, 5, 10, 100})) / 100.0;
    c.mask = int(pick({0, 0, 1, 2}));
    c.integer_logits = rng() % 4 == 0;
    c.cache_limit = pick({1 << 20, 1 << 20, 700, 64});  // small caches exercise the recompute path
    const int dtype = int(rng() % 3);
    std::printf("case %d: %s B=%lld S=%lld V=%lld [%lld, %lld) T=%g top_k=%lld top_p=%g min_p=%g k=%lld "
                "alpha=%g mask=%d integer=%d dtype=%d cache=%lld\n",
                i, c.contrastive ? "CD-K" : "CFG", (long long)c.batch, (long long)c.streams, (long long)c.vocab,
                (long long)c.lo, (long long)c.hi, c.temperature, (long long)c.top_k, c.top_p, c.min_p,
                (long long)c.k, c.alpha, c.mask, int(c.integer_logits), dtype, (long long)c.cache_limit);
    mismatches += dtype == 0 ? run_case<float>(c, rng) : dtype == 1 ? run_case<bf16>(c, rng) : run_case<fp16>(c, rng);
  }
  // CD-K with subnormal expert logits (every other case subnormal amateur logits too), in fp32 and bf16 (fp16
  // values are never fp32-subnormal): the kernels must keep subnormals as the CPU kernel does. With alpha = 1
  // the head set is {expert >= k-th largest}: flushing to zero merges it (these cases fail under FTZ).
  for (int i = 0; i < 6; ++i) {
    Case c{true, 2, 2, pick({33, 1000, 3001}), 0, 0, 0, pick({1, 2, 5}), pick({1 << 20, 64}), float(i % 3 != 0),
           1.0, 0.0, i < 4 ? 1.0 : 0.5, int(pick({0, 1})), false, 1 + i % 2};
    c.lo = pick({0, 1});
    c.hi = c.vocab;
    std::printf("subnormal case %d: V=%lld [%lld, %lld) T=%g k=%lld alpha=%g mask=%d streams=%d dtype=%d "
                "cache=%lld\n", i, (long long)c.vocab, (long long)c.lo, (long long)c.hi, c.temperature,
                (long long)c.k, c.alpha, c.mask, c.subnormal_streams, i % 2, (long long)c.cache_limit);
    mismatches += i % 2 == 0 ? run_case<float>(c, rng) : run_case<bf16>(c, rng);
  }
  std::printf("mismatching rows: %d\n", mismatches);
  return mismatches == 0 ? 0 : 1;
}
