// VQ gather on the GPU. One thread per 16-byte chunk of an output row when rows are 16-byte aligned
// (vectorised copies), else one thread per element.
#include "vq/vq_cuda.h"

namespace cm3leon::vq {
namespace {

template <typename Chunk>
__global__ void gather_rows(const int64_t* __restrict__ indices, const Chunk* __restrict__ codebook, int64_t n,
                            int64_t k, int64_t chunks_per_row, Chunk* __restrict__ out,
                            long long* __restrict__ bad_index) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n * chunks_per_row) return;
  const int64_t row = i / chunks_per_row, col = i % chunks_per_row;
  const int64_t code = indices[row];
  if (code < 0 || code >= k) {
    out[i] = Chunk{};
    if (col == 0) atomicMin(bad_index, (long long)row);
    return;
  }
  out[i] = codebook[code * chunks_per_row + col];
}

}  // namespace

cudaError_t embed_cuda(DType dtype, const int64_t* indices, const void* codebook, int64_t n, int64_t k,
                       int64_t d, void* out, long long* bad_index, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t row_bytes = d * (dtype == DType::Float32 ? 4 : 2);
  const bool vectorised = row_bytes % 16 == 0 && reinterpret_cast<uintptr_t>(codebook) % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(out) % 16 == 0;
  constexpr int threads = 256;
  if (vectorised) {
    const int64_t chunks = row_bytes / 16, total = n * chunks;
    gather_rows<<<unsigned((total + threads - 1) / threads), threads, 0, stream>>>(
        indices, static_cast<const int4*>(codebook), n, k, chunks, static_cast<int4*>(out), bad_index);
  } else if (dtype == DType::Float32) {
    const int64_t total = n * d;
    gather_rows<<<unsigned((total + threads - 1) / threads), threads, 0, stream>>>(
        indices, static_cast<const float*>(codebook), n, k, d, static_cast<float*>(out), bad_index);
  } else {
    const int64_t total = n * d;
    gather_rows<<<unsigned((total + threads - 1) / threads), threads, 0, stream>>>(
        indices, static_cast<const unsigned short*>(codebook), n, k, d, static_cast<unsigned short*>(out),
        bad_index);
  }
  return cudaGetLastError();
}

}  // namespace cm3leon::vq
