// How the tensor-core forward of the fused loss divides its work (torch-free host code, no CuTe: the launcher
// sizes the workspace with it). Tile sizes of loss_mma.cuh.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

#include "loss/loss_cpu.h"

namespace cm3leon::loss::mma {

constexpr int kTileTokens = 128;  // tokens per block
constexpr int kTileVocab = 128;   // vocabulary rows per tile

// A block's partial statistics of one token over its vocabulary split (see loss_mma.cuh).
struct Partial {
  float max, sum_exp, sum, target;
};

// The forward gives each block 128 tokens and a split of the vocabulary: at least 4 blocks per SM in all (one
// fits an SM at a time), so T = 8,192 (64 token tiles) still fills a 132-SM H100 and the last wave is short.
// Each block writes a Partial per token into workspace [splits, T], merged in split order afterwards.
struct ForwardPlan {
  int64_t token_tiles, tiles_per_split;
  int splits;
  size_t workspace_bytes;
};

inline cudaError_t plan_forward(const LossConfig& cfg, ForwardPlan* plan) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t token_tiles = (cfg.tokens + kTileTokens - 1) / kTileTokens;
  const int64_t vocab_tiles = (cfg.vocab + kTileVocab - 1) / kTileVocab;
  const int64_t want = std::clamp<int64_t>((4 * int64_t(sms) + token_tiles - 1) / std::max<int64_t>(token_tiles, 1),
                                           1, std::min<int64_t>(vocab_tiles, 65535));
  plan->token_tiles = token_tiles;
  plan->tiles_per_split = (vocab_tiles + want - 1) / want;
  plan->splits = int((vocab_tiles + plan->tiles_per_split - 1) / plan->tiles_per_split);
  plan->workspace_bytes = size_t(plan->splits) * size_t(cfg.tokens) * sizeof(Partial);
  return cudaSuccess;
}

}  // namespace cm3leon::loss::mma
