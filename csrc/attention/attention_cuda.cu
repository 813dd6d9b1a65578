// Host entry points of the CUDA attention forward and KV-cache kernels: pick the kernel and its
// instantiation for a call, launch it. (The sm80 tensor-core instantiations live in
// attention_forward_sm80_hdim*.cu; this file holds the small kernels: float32 SIMT, decode, append.)
#include "attention/attention_cuda.h"

#include <cutlass/numeric_types.h>

#include "attention/attention_decode_cuda.cuh"
#include "attention/attention_forward_simt.cuh"
#include "attention/attention_forward_sm80.h"

namespace cm3leon::attention::cuda {
namespace {

template <typename Element>
cudaError_t forward_sm80_by_head_dim(const AttnParams& p, cudaStream_t stream) {
  if (p.head_dim <= 64) return run_forward_sm80<Element, 64>(p, stream);
  if (p.head_dim <= 128) return run_forward_sm80<Element, 128>(p, stream);
  return run_forward_sm80<Element, 256>(p, stream);
}

cudaError_t forward_simt(const AttnParams& p, cudaStream_t stream) {
  const int blocks = (p.seqlen_q + kSimtWarps - 1) / kSimtWarps;
  if (blocks == 0 || p.batch == 0) return cudaSuccess;
  forward_simt_kernel<<<dim3(unsigned(blocks), unsigned(p.batch), unsigned(p.heads_q)), kSimtWarps * 32, 0,
                        stream>>>(p);
  return cudaGetLastError();
}

// Threads per key: the head dim's 16-byte vectors rounded up to a power of two (at least 8, at most 32);
// NV vectors per thread when one warp is not enough (float32 beyond 128 dims).
template <typename T, int ROWS>
cudaError_t decode_launch(const AttnParams& p, const KvLayout& lay, int splits, float* ws, cudaStream_t stream) {
  const dim3 grid(unsigned(splits), unsigned(p.heads_kv), unsigned(p.batch));
  float* ws_out = ws;
  float* ws_lse = ws == nullptr ? nullptr : ws + int64_t(splits) * p.batch * p.heads_q * p.seqlen_q * p.head_dim;
  const int vectors = p.head_dim * int(sizeof(T)) / 16;
  if (vectors <= 8) {
    decode_split_kernel<T, 8, 1, ROWS><<<grid, kDecodeThreads, 0, stream>>>(p, lay, splits, ws_out, ws_lse);
  } else if (vectors <= 16) {
    decode_split_kernel<T, 16, 1, ROWS><<<grid, kDecodeThreads, 0, stream>>>(p, lay, splits, ws_out, ws_lse);
  } else if (vectors <= 32) {
    decode_split_kernel<T, 32, 1, ROWS><<<grid, kDecodeThreads, 0, stream>>>(p, lay, splits, ws_out, ws_lse);
  } else if constexpr (sizeof(T) == 4) {
    decode_split_kernel<T, 32, 2, ROWS><<<grid, kDecodeThreads, 0, stream>>>(p, lay, splits, ws_out, ws_lse);
  } else {
    return cudaErrorInvalidValue;  // unreachable: head dims are at most 256
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || splits == 1) return err;
  const int64_t rows = int64_t(p.batch) * p.heads_q * p.seqlen_q;
  decode_merge_kernel<T><<<unsigned(rows), kDecodeThreads, 0, stream>>>(p, splits, ws_out, ws_lse);
  return cudaGetLastError();
}

template <typename T>
cudaError_t decode_typed(const AttnParams& p, const KvLayout& lay, int splits, float* ws, cudaStream_t stream) {
  const int rows = p.heads_q / p.heads_kv * p.seqlen_q;
  return rows == 1 ? decode_launch<T, 1>(p, lay, splits, ws, stream)
                   : decode_launch<T, kDecodeMaxRows>(p, lay, splits, ws, stream);
}

unsigned grid_stride_blocks(int64_t total, int threads) {
  const int64_t blocks = (total + threads - 1) / threads;
  return unsigned(blocks < 65536 ? blocks : 65536);
}

}  // namespace

cudaError_t forward_cuda(DType dtype, const AttnParams& p, cudaStream_t stream) {
  switch (dtype) {
    case DType::BFloat16: return forward_sm80_by_head_dim<cutlass::bfloat16_t>(p, stream);
    case DType::Float16: return forward_sm80_by_head_dim<cutlass::half_t>(p, stream);
    case DType::Float32: return forward_simt(p, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t append_kv_cuda(int64_t elem_size, const void* src, void* cache, int64_t batch, int64_t new_len,
                           int64_t row_elems, const int32_t* cache_seqlens, int32_t start_if_null,
                           const KvLayout& layout, cudaStream_t stream) {
  const int64_t chunks = row_elems * elem_size / 16, total = batch * new_len * chunks;
  if (total == 0) return cudaSuccess;
  constexpr int threads = 256;
  append_kv_kernel<<<grid_stride_blocks(total, threads), threads, 0, stream>>>(
      static_cast<const uint4*>(src), static_cast<uint4*>(cache), batch, new_len, chunks, cache_seqlens,
      start_if_null, layout);
  return cudaGetLastError();
}

cudaError_t rotary_cuda(DType dtype, const RotaryCall& call, cudaStream_t stream) {
  const int64_t total = call.batch * call.len * call.heads * call.head_dim;
  if (total == 0) return cudaSuccess;
  constexpr int threads = 256;
  const unsigned blocks = grid_stride_blocks(total, threads);
  switch (dtype) {
    case DType::BFloat16: rotary_kernel<__nv_bfloat16><<<blocks, threads, 0, stream>>>(call); break;
    case DType::Float16: rotary_kernel<__half><<<blocks, threads, 0, stream>>>(call); break;
    case DType::Float32: rotary_kernel<float><<<blocks, threads, 0, stream>>>(call); break;
  }
  return cudaGetLastError();
}

bool decode_applies(const AttnParams& p) {
  return p.cu_seqlens_q == nullptr && p.seqlen_q > 0 && p.heads_q / p.heads_kv * p.seqlen_q <= kDecodeMaxRows;
}

int decode_num_splits(const AttnParams& p, int sm_count) {
  // About four blocks per SM in all, but at least ~64 keys per split; at most 64 splits.
  const int64_t pairs = int64_t(p.batch) * p.heads_kv;
  const int64_t wanted = (4 * int64_t(sm_count) + pairs - 1) / pairs;
  const int64_t by_keys = (p.k_batch_tokens + 63) / 64;
  const int64_t splits = wanted < by_keys ? wanted : by_keys;
  return int(splits < 1 ? 1 : (splits > 64 ? 64 : splits));
}

int64_t decode_workspace_floats(const AttnParams& p, int num_splits) {
  return num_splits <= 1 ? 0 : int64_t(num_splits) * p.batch * p.heads_q * p.seqlen_q * (p.head_dim + 1);
}

cudaError_t decode_cuda(DType dtype, const AttnParams& p, const KvLayout& layout, int num_splits, float* workspace,
                        cudaStream_t stream) {
  if (p.batch == 0 || p.seqlen_q == 0) return cudaSuccess;
  switch (dtype) {
    case DType::BFloat16: return decode_typed<__nv_bfloat16>(p, layout, num_splits, workspace, stream);
    case DType::Float16: return decode_typed<__half>(p, layout, num_splits, workspace, stream);
    case DType::Float32: return decode_typed<float>(p, layout, num_splits, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cm3leon::attention::cuda
