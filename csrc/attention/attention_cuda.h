// Torch-free CUDA entry points of the attention forward and KV-cache kernels (raw pointers + a stream).
// The launcher (attention_cuda_launch.cpp) validates shapes and fills AttnParams.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "common/dtype.h"

namespace cm3leon::attention::cuda {

struct AttnParams;
struct KvLayout;  // attention_kvcache_cuda.h
struct RotaryCall;

// out/lse of softmax(scale q k^T + mask) v for dense, varlen and KV-cache layouts. bf16/fp16 run the sm80
// tensor-core kernel (head dims 64, 128, 256; other multiples of 8 run in the next larger one);
// float32 runs a SIMT kernel (the slow path: no tensor cores).
cudaError_t forward_cuda(DType dtype, const AttnParams& p, cudaStream_t stream);

// Copies new rows [batch][new_len][row_elems] into the cache at positions cache_seqlens[b] + t (device, or
// start_if_null for every row) of each row, through the layout. Positions outside a row are skipped.
cudaError_t append_kv_cuda(int64_t elem_size, const void* src, void* cache, int64_t batch, int64_t new_len,
                           int64_t row_elems, const int32_t* cache_seqlens, int32_t start_if_null,
                           const KvLayout& layout, cudaStream_t stream);

// Rotary embedding of new k rows into the cache, or of q into a copy (RotaryCall).
cudaError_t rotary_cuda(DType dtype, const RotaryCall& call, cudaStream_t stream);

// Split-KV decode: for (heads_q / heads_kv) * seqlen_q <= kDecodeMaxRows. Every split of a row's valid keys
// writes a partial (out, lse) to `workspace` (decode_workspace_floats floats) and a second kernel merges
// them by lse; with one split the result goes straight to out/lse and the workspace is unused.
constexpr int kDecodeMaxRows = 8;
bool decode_applies(const AttnParams& p);
int decode_num_splits(const AttnParams& p, int sm_count);
int64_t decode_workspace_floats(const AttnParams& p, int num_splits);
// Keys of batch row b are its cache positions [cache_leftpad[b], cache_seqlens[b] + cache_extra), read through
// the layout.
cudaError_t decode_cuda(DType dtype, const AttnParams& p, const KvLayout& layout, int num_splits, float* workspace,
                        cudaStream_t stream);

}  // namespace cm3leon::attention::cuda
