// Host side of the CUDA nearest-code search: the plan (code splits, padding, workspace layout) and the four
// launches (statistics, optional padding copies, GEMM, finaliser), all on the caller's stream with no sync.
#include <algorithm>

#include "vq/vq_cuda.h"
#include "vq/vq_nearest_exact.cuh"

namespace cm3leon::vq {
namespace {

using namespace nearest_gpu;

constexpr size_t kAlign = 256;
constexpr size_t kHeaderBytes = sizeof(unsigned long long) + sizeof(CodebookBounds);  // memset per call
constexpr int kThreads = 256;

size_t align_up(size_t x) { return (x + kAlign - 1) / kAlign * kAlign; }
int64_t element_bytes(DType dtype) { return dtype == DType::Float32 ? 4 : 2; }
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
unsigned blocks_for(int64_t threads) { return unsigned((threads + kThreads - 1) / kThreads); }

template <typename F>
cudaError_t dispatch_device(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::BFloat16: return f(__nv_bfloat16{});
    case DType::Float16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

// Copies rows of d elements into rows of d_pad (zero tail) at dst.
cudaError_t pad_rows(DType dtype, const void* src, int64_t rows, int64_t d, int64_t d_pad, void* dst,
                     cudaStream_t stream) {
  const unsigned blocks = unsigned(std::min<int64_t>(blocks_for(rows * d_pad), 1 << 16));
  if (element_bytes(dtype) == 4)
    pad_rows_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const unsigned*>(src), rows, d, d_pad,
                                                     static_cast<unsigned*>(dst));
  else
    pad_rows_kernel<<<blocks, kThreads, 0, stream>>>(static_cast<const unsigned short*>(src), rows, d, d_pad,
                                                     static_cast<unsigned short*>(dst));
  return cudaGetLastError();
}

}  // namespace

cudaError_t plan_nearest_cuda(DType dtype, const void* z, const void* codebook, int64_t n, int64_t k, int64_t d,
                              NearestPlan* plan) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  NearestPlan p{};
  p.n = n;
  p.k = k;
  p.d = d;
  // The GEMM copies 16-byte vectors: rows must be a whole number of them and start 16-byte aligned, else
  // they are first copied into the workspace with a zero tail (zeros change no dot product).
  const int64_t bytes = element_bytes(dtype), vec = 16 / bytes;
  p.d_pad = (d + vec - 1) / vec * vec;
  p.pad_z = p.d_pad != d || !aligned16(z);
  p.pad_codebook = p.d_pad != d || !aligned16(codebook);
  p.row_tiles = int((n + kTileRows - 1) / kTileRows);
  const int code_tiles = int((k + kTileCodes - 1) / kTileCodes);
  // One block per SM at least: few row tiles (decode-sized calls) split the codebook across blocks.
  const int want = std::min(code_tiles, std::max(1, (sms + p.row_tiles - 1) / p.row_tiles));
  p.tiles_per_split = (code_tiles + want - 1) / want;
  p.splits = (code_tiles + p.tiles_per_split - 1) / p.tiles_per_split;

  size_t offset = align_up(kHeaderBytes);
  p.stats_offset = offset;
  offset = align_up(offset + size_t(k) * sizeof(CodeStats));
  p.partials_offset = offset;
  offset = align_up(offset + size_t(p.splits) * size_t(n) * sizeof(Candidates));
  p.z_offset = offset;
  if (p.pad_z) offset = align_up(offset + size_t(n) * size_t(p.d_pad) * size_t(bytes));
  p.codebook_offset = offset;
  if (p.pad_codebook) offset = align_up(offset + size_t(k) * size_t(p.d_pad) * size_t(bytes));
  p.workspace_bytes = offset;
  *plan = p;
  return cudaSuccess;
}

cudaError_t nearest_cuda(const NearestPlan& plan, DType dtype, const void* z, const void* codebook, Metric metric,
                         void* workspace, int64_t* indices, float* distance, cudaStream_t stream) {
  char* ws = static_cast<char*>(workspace);
  auto* non_finite_rows = reinterpret_cast<unsigned long long*>(ws);
  auto* bounds = reinterpret_cast<CodebookBounds*>(ws + sizeof(unsigned long long));
  auto* stats = reinterpret_cast<CodeStats*>(ws + plan.stats_offset);
  auto* partials = reinterpret_cast<Candidates*>(ws + plan.partials_offset);
  const bool cosine = metric == Metric::Cosine;

  cudaError_t err = cudaMemsetAsync(ws, 0, kHeaderBytes, stream);
  const void* gemm_z = z;
  const void* gemm_codebook = codebook;
  if (err == cudaSuccess && plan.pad_z) {
    gemm_z = ws + plan.z_offset;
    err = pad_rows(dtype, z, plan.n, plan.d, plan.d_pad, ws + plan.z_offset, stream);
  }
  if (err == cudaSuccess && plan.pad_codebook) {
    gemm_codebook = ws + plan.codebook_offset;
    err = pad_rows(dtype, codebook, plan.k, plan.d, plan.d_pad, ws + plan.codebook_offset, stream);
  }
  if (err == cudaSuccess)
    err = dispatch_device(dtype, [&](auto tag) {
      using T = decltype(tag);
      code_stats_kernel<T><<<blocks_for(plan.k * 32), kThreads, 0, stream>>>(
          static_cast<const T*>(codebook), plan.k, plan.d, cosine, stats, bounds);
      return cudaGetLastError();
    });
  if (err != cudaSuccess) return err;

  const GemmParams gemm{gemm_z, gemm_codebook, plan.n, int32_t(plan.k), int32_t(plan.d_pad),
                        plan.tiles_per_split, stats, partials};
  switch (dtype) {
    case DType::Float32: err = launch_gemm_fp32(gemm, plan.row_tiles, plan.splits, stream); break;
    case DType::BFloat16: err = launch_gemm_bf16(gemm, plan.row_tiles, plan.splits, stream); break;
    case DType::Float16: err = launch_gemm_fp16(gemm, plan.row_tiles, plan.splits, stream); break;
  }
  if (err != cudaSuccess) return err;

  // fp32 inputs reach the MMA truncated to TF32 (relative error < 2^-10 per factor); 16-bit products are exact.
  const double product_error = dtype == DType::Float32 ? 0x1p-9 + 0x1p-20 : 0.0;
  const FinalizeParams fin{z, codebook, plan.n, plan.k, plan.d, cosine, plan.splits, product_error, partials,
                           bounds, indices, distance, non_finite_rows};
  return dispatch_device(dtype, [&](auto tag) {
    using T = decltype(tag);
    finalize_kernel<T><<<blocks_for(plan.n * 32), kThreads, 0, stream>>>(fin);
    return cudaGetLastError();
  });
}

}  // namespace cm3leon::vq
