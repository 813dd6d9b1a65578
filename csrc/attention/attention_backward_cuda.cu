// Attention backward on the GPU: the three passes and the dispatch to a main kernel.
//   1. preprocess: D = rowsum(dO * O) per (query, head) in fp32, and zero the fp32 dQ accumulator;
//   2. main kernel (per key block): dK, dV written directly, dQ added into the accumulator with atomics;
//   3. postprocess: dQ = scale * accumulator, in the output dtype.
// bf16 / fp16 run the tensor-core kernel of the smallest head-dim bucket (64, 128, 256) that holds head_dim;
// float32 runs the SIMT kernel. (Three buckets, not one per head dim: each costs ~1 CPU-minute of nvcc per
// arch.)
#include <cutlass/numeric_types.h>

#include "attention/attention_backward_kernels.h"
#include "attention/attention_backward_simt.cuh"

namespace cm3leon::attention {
namespace bwd {
namespace {

constexpr int kThreads = 256;

// One warp per (token, head) row of dO / O, which are [rows][d] with row = token * heads_q + head.
template <typename T>
__global__ void __launch_bounds__(kThreads) preprocess_kernel(const T* dout, const T* out, float* dsum,
                                                              float* dq_accum, int64_t rows, int64_t heads_q,
                                                              int64_t total_q, int d) {
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  if (row >= rows) return;  // uniform per warp
  const int lane = threadIdx.x % 32;
  const T* g = dout + row * d;
  const T* o = out + row * d;
  float* acc = dq_accum + row * d;
  float sum = 0.f;
  for (int c = lane; c < d; c += 32) {
    sum += float(g[c]) * float(o[c]);
    acc[c] = 0.f;
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) dsum[(row % heads_q) * total_q + row / heads_q] = sum;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) postprocess_kernel(const float* dq_accum, T* dq, int64_t n,
                                                               float scale) {
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads)
    dq[i] = T(dq_accum[i] * scale);
}

unsigned grid_for(int64_t work, int64_t per_block) {
  const int64_t blocks = (work + per_block - 1) / per_block;
  return unsigned(blocks < 65536 ? blocks : 65536);  // grid-stride loops cover the rest
}

template <typename F>
decltype(auto) dispatch_cuda_float(DType dtype, F&& f) {
  switch (dtype) {
    case DType::BFloat16: return f(cutlass::bfloat16_t{});
    case DType::Float16: return f(cutlass::half_t{});
    default: return f(float{});
  }
}

cudaError_t main_kernel(const BackwardParams& p, cudaStream_t stream) {
  if (p.dtype == DType::Float32) return backward_simt(p, stream);
  if (p.head_dim <= 64) return backward_sm80<64>(p, stream);
  if (p.head_dim <= 128) return backward_sm80<128>(p, stream);
  return backward_sm80<256>(p, stream);
}

}  // namespace

cudaError_t backward_simt(const BackwardParams& p, cudaStream_t stream) {
  const int64_t blocks = grid_key_blocks(p, kSimtBlock) * p.heads_kv * p.batch;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const size_t smem = simt_smem_bytes(p.head_dim);
  if (smem > 48 * 1024) {
    // Opt in once for the largest head dim: a per-call value could lower the limit under a concurrent
    // launch with a larger head dim from another host thread.
    const cudaError_t err = cudaFuncSetAttribute(&backward_simt_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 int(simt_smem_bytes(256)));
    if (err != cudaSuccess) return err;
  }
  backward_simt_kernel<<<dim3(unsigned(blocks)), kSimtThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace bwd

cudaError_t backward_cuda(const BackwardParams& p, cudaStream_t stream) {
  const int64_t rows = p.total_q * p.heads_q, n = rows * p.head_dim;
  if (rows > 0) {
    const int64_t pre_blocks = (rows + bwd::kThreads / 32 - 1) / (bwd::kThreads / 32);
    if (pre_blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
    bwd::dispatch_cuda_float(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      bwd::preprocess_kernel<T><<<unsigned(pre_blocks), bwd::kThreads, 0, stream>>>(
          static_cast<const T*>(p.dout), static_cast<const T*>(p.out), p.dsum, p.dq_accum, rows, p.heads_q,
          p.total_q, int(p.head_dim));
    });
    if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
  }
  if (const cudaError_t err = bwd::main_kernel(p, stream); err != cudaSuccess) return err;
  if (n > 0) {
    bwd::dispatch_cuda_float(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      bwd::postprocess_kernel<T><<<bwd::grid_for(n, bwd::kThreads), bwd::kThreads, 0, stream>>>(
          p.dq_accum, static_cast<T*>(p.dq), n, p.scale);
    });
  }
  return cudaGetLastError();
}

}  // namespace cm3leon::attention
