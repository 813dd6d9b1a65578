// Fused linear + cross-entropy: the input checks and the fp32 path, SIMT kernels in exact fp32 (torch-free;
// bf16 / fp16 run on tensor cores, loss_mma.cuh). A block owns kTokens tokens and walks the
// vocabulary in tiles of kRows weight rows, staging kDepth-deep slices of both operands in shared memory;
// each thread computes kPerThread logits of one token. The forward keeps an online (max, sum exp, sum)
// per thread and merges the 16 threads of a token with warp shuffles; the gradient kernel turns a tile of
// logits into dl/dz in shared memory and reduces its contributions over the tile before one atomic add
// per element of grad_hidden / grad_weight. Never materialises [T, V].
#include "loss/loss_cuda.h"
#include "loss/loss_mma_plan.h"

#include <climits>
#include <cmath>

namespace cm3leon::loss {

namespace {

constexpr int kTokens = 16;                           // tokens per block
constexpr int kRows = 64;                             // vocabulary rows per tile
constexpr int kDepth = 32;                            // depth slice staged in shared memory
constexpr int kThreads = 256;                         // 16 threads per token
constexpr int kLanesPerToken = kThreads / kTokens;    // 16
constexpr int kPerThread = kRows / kLanesPerToken;    // 4 logits per thread and tile

// Logits of the block's tokens against weight rows [v0, v0 + kRows) for this thread: out[j] is the logit of
// token threadIdx.x / 16 and row v0 + lane + 16 j (soft-capped; rows past V are left at -inf).
__device__ void tile_logits(const float* hidden, const float* weight, const LossConfig& cfg, int64_t t0, int64_t v0,
                            float (*hs)[kDepth + 1], float (*ws)[kDepth + 1], float* out) {
  const int tid = threadIdx.x, tok = tid / kLanesPerToken, lane = tid % kLanesPerToken;
  float acc[kPerThread] = {};
  for (int64_t k0 = 0; k0 < cfg.dim; k0 += kDepth) {
    for (int i = tid; i < kTokens * kDepth; i += kThreads) {
      const int r = i / kDepth, c = i % kDepth;
      const int64_t t = t0 + r, d = k0 + c;
      hs[r][c] = (t < cfg.tokens && d < cfg.dim) ? hidden[t * cfg.dim + d] : 0.f;
    }
    for (int i = tid; i < kRows * kDepth; i += kThreads) {
      const int r = i / kDepth, c = i % kDepth;
      const int64_t v = v0 + r, d = k0 + c;
      ws[r][c] = (v < cfg.vocab && d < cfg.dim) ? weight[v * cfg.dim + d] : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int c = 0; c < kDepth; ++c) {
      const float h = hs[tok][c];
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) acc[j] = fmaf(h, ws[lane + kLanesPerToken * j][c], acc[j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int64_t v = v0 + lane + kLanesPerToken * j;
    float z = acc[j];
    if (cfg.softcap > 0.f) z = cfg.softcap * tanhf(z / cfg.softcap);
    out[j] = v < cfg.vocab ? z : -INFINITY;
  }
}

__global__ void check_kernel(const int64_t* targets, const float* loss_weights, LossConfig cfg,
                             long long* bad_target, long long* bad_weight, double* weight_sum) {
  double local = 0.0;
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < cfg.tokens;
       t += int64_t(gridDim.x) * blockDim.x) {
    const int64_t y = targets[t];
    if (y == cfg.ignore_index) continue;
    if (y < 0 || y >= cfg.vocab) atomicMin(bad_target, (long long)t);
    const float w = loss_weights ? loss_weights[t] : 1.f;
    if (!(w >= 0.f) || !isfinite(w)) atomicMin(bad_weight, (long long)t);
    local += w;
  }
  if (local != 0.0) atomicAdd(weight_sum, local);
}

__global__ void __launch_bounds__(kThreads) forward_kernel(const float* hidden, const float* weight,
                                                           const int64_t* targets, const float* loss_weights,
                                                           LossConfig cfg, float* lse, float* loss) {
  __shared__ float hs[kTokens][kDepth + 1];
  __shared__ float ws[kRows][kDepth + 1];
  __shared__ float target_logit[kTokens];
  const int tid = threadIdx.x, tok = tid / kLanesPerToken, lane = tid % kLanesPerToken;
  const int64_t t0 = int64_t(blockIdx.x) * kTokens, t = t0 + tok;
  const int64_t y = t < cfg.tokens ? targets[t] : cfg.ignore_index;
  if (lane == 0) target_logit[tok] = 0.f;
  float m = -INFINITY, s = 0.f, sz = 0.f;
  for (int64_t v0 = 0; v0 < cfg.vocab; v0 += kRows) {
    float z[kPerThread];
    tile_logits(hidden, weight, cfg, t0, v0, hs, ws, z);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t v = v0 + lane + kLanesPerToken * j;
      if (v >= cfg.vocab) continue;
      if (v == y) target_logit[tok] = z[j];
      sz += z[j];
      const float mn = fmaxf(m, z[j]);
      s = s * __expf(m - mn) + __expf(z[j] - mn);
      m = isnan(z[j]) ? z[j] : mn;
    }
  }
  // Merge the 16 lanes of the token (consecutive lanes of one warp).
  for (int off = kLanesPerToken / 2; off > 0; off /= 2) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, off), s2 = __shfl_xor_sync(0xffffffffu, s, off);
    sz += __shfl_xor_sync(0xffffffffu, sz, off);
    const float mn = fmaxf(m, m2);
    s = (m == -INFINITY ? 0.f : s * __expf(m - mn)) + (m2 == -INFINITY ? 0.f : s2 * __expf(m2 - mn));
    m = (isnan(m) || isnan(m2)) ? NAN : mn;
  }
  __syncthreads();
  if (lane != 0 || t >= cfg.tokens) return;
  const float l = m + logf(s);
  lse[t] = l;
  if (y == cfg.ignore_index) {
    loss[t] = 0.f;
    return;
  }
  const float w = loss_weights ? loss_weights[t] : 1.f, eps = cfg.label_smoothing;
  loss[t] = w * ((1.f - eps) * (l - target_logit[tok]) + eps * (l - sz / float(cfg.vocab)) + cfg.z_loss * l * l);
}

__global__ void __launch_bounds__(kThreads) gradient_kernel(const float* hidden, const float* weight,
                                                            const int64_t* targets, LossConfig cfg,
                                                            const float* lse, const float* a,
                                                            const float* b, const float* e, float* grad_hidden,
                                                            float* grad_weight) {
  __shared__ float hs[kTokens][kDepth + 1];
  __shared__ float ws[kRows][kDepth + 1];
  __shared__ float g[kTokens][kRows + 1];
  const int tid = threadIdx.x, tok = tid / kLanesPerToken, lane = tid % kLanesPerToken;
  const int64_t t0 = int64_t(blockIdx.x) * kTokens, v0 = int64_t(blockIdx.y) * kRows, t = t0 + tok;
  float z[kPerThread];
  tile_logits(hidden, weight, cfg, t0, v0, hs, ws, z);
  const bool live = t < cfg.tokens;
  const int64_t y = live ? targets[t] : cfg.ignore_index;
#pragma unroll
  for (int j = 0; j < kPerThread; ++j) {
    const int col = lane + kLanesPerToken * j;
    const int64_t v = v0 + col;
    float grad = 0.f;
    if (live && v < cfg.vocab) {
      grad = a[t] * __expf(z[j] - lse[t]) - e[t] - (v == y ? b[t] : 0.f);
      if (cfg.softcap > 0.f) grad *= 1.f - (z[j] / cfg.softcap) * (z[j] / cfg.softcap);
    }
    g[tok][col] = grad;
  }
  __syncthreads();
  // grad_hidden[t, d] += sum over the tile's rows; grad_weight[v, d] += sum over the tile's tokens.
  for (int64_t i = tid; i < int64_t(kTokens) * cfg.dim; i += kThreads) {
    const int r = int(i / cfg.dim);
    const int64_t d = i % cfg.dim, tt = t0 + r;
    if (tt >= cfg.tokens) continue;
    float acc = 0.f;
    for (int c = 0; c < kRows && v0 + c < cfg.vocab; ++c) acc = fmaf(g[r][c], weight[(v0 + c) * cfg.dim + d], acc);
    atomicAdd(grad_hidden + tt * cfg.dim + d, acc);
  }
  for (int64_t i = tid; i < int64_t(kRows) * cfg.dim; i += kThreads) {
    const int c = int(i / cfg.dim);
    const int64_t d = i % cfg.dim, v = v0 + c;
    if (v >= cfg.vocab) continue;
    float acc = 0.f;
    for (int r = 0; r < kTokens && t0 + r < cfg.tokens; ++r) acc = fmaf(g[r][c], hidden[(t0 + r) * cfg.dim + d], acc);
    atomicAdd(grad_weight + v * cfg.dim + d, acc);
  }
}

unsigned blocks_for(int64_t n, int64_t per_block) { return unsigned((n + per_block - 1) / per_block); }

}  // namespace

cudaError_t check_inputs_cuda(const int64_t* targets, const float* loss_weights, const LossConfig& cfg,
                              long long* bad_target, long long* bad_weight, double* weight_sum,
                              cudaStream_t stream) {
  if (cfg.tokens == 0) return cudaSuccess;
  const unsigned grid = blocks_for(cfg.tokens, kThreads) < 1024 ? blocks_for(cfg.tokens, kThreads) : 1024;
  check_kernel<<<grid, kThreads, 0, stream>>>(targets, loss_weights, cfg, bad_target, bad_weight, weight_sum);
  return cudaGetLastError();
}

cudaError_t forward_workspace_cuda(DType dtype, const LossConfig& cfg, size_t* bytes) {
  *bytes = 0;
  if (dtype == DType::Float32) return cudaSuccess;
  mma::ForwardPlan plan;
  const cudaError_t err = mma::plan_forward(cfg, &plan);
  if (err == cudaSuccess) *bytes = plan.workspace_bytes;
  return err;
}

cudaError_t forward_fp32_cuda(CM3LEON_LOSS_CUDA_FORWARD_PARAMS) {  // needs no workspace
  if (cfg.tokens == 0) return cudaSuccess;
  forward_kernel<<<blocks_for(cfg.tokens, kTokens), kThreads, 0, stream>>>(
      static_cast<const float*>(hidden), static_cast<const float*>(weight), targets, loss_weights, cfg, lse, loss);
  return cudaGetLastError();
}

cudaError_t gradients_fp32_cuda(CM3LEON_LOSS_CUDA_GRADIENT_PARAMS) {
  if (cfg.tokens == 0) return cudaSuccess;
  if (blocks_for(cfg.vocab, kRows) > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(blocks_for(cfg.tokens, kTokens), blocks_for(cfg.vocab, kRows));
  gradient_kernel<<<grid, kThreads, 0, stream>>>(static_cast<const float*>(hidden), static_cast<const float*>(weight),
                                                 targets, cfg, lse, a, b, e, grad_hidden_f32, grad_weight_f32);
  return cudaGetLastError();
}

}  // namespace cm3leon::loss
