// Fused linear + cross-entropy for bf16 / fp16 on tensor cores (CuTe, sm_80 mma.sync; also runs on sm_90).
// Same contract as the CPU kernel (docs/loss.md): fp32 accumulation, fp32 loss / lse / gradients.
//
// Both kernels compute logits = hidden [T, D] . weight [V, D]^T in 128 x 128 tiles (tokens x vocabulary
// rows; gemm_sm80::TileConfig: 8 warps as 4 along tokens x 2 along the vocabulary, each thread holding 64
// fp32 logits of 4 token rows) and never write them to memory:
//
// forward   a block owns 128 tokens and streams the vocabulary tiles of its split (loss_mma_plan.h) past
//           them: a 3-stage cp.async pipeline over (vocabulary tile, 64-deep depth chunk) pairs. After a
//           tile's last chunk each thread folds its logits into per-row online statistics (running max, sum of
//           exp relative to it, sum of logits for label smoothing) and the thread holding a row's target
//           writes its logit to shared memory. At the end the 8 holders of a row (the 4 lanes of an mma quad x
//           the 2 warps along the vocabulary) merge their statistics into the row's Partial of the split; a
//           second kernel merges the splits in order into lse and the loss (so both are reproducible).
//
// gradients a block owns one (token tile, vocabulary tile) pair. It recomputes the 128 x 128 logits with the
//           same pipeline, turns them into G = dl/dz in registers (exactly as the fp32 SIMT kernel), scales G
//           by a power of two so its largest entry is near 2^15 and stores it as 16-bit in shared memory
//           (fp16's range would otherwise flush small gradients; the scale is undone exactly in fp32). Then
//           it walks the depth in 64-wide chunks (pipelined like the logits) and per chunk computes
//             grad_hidden[tokens, chunk] += G . W[vocab rows, chunk]      (128 x 64, reduced over 128 rows)
//             grad_weight[vocab rows, chunk] += G^T . H[tokens, chunk]    (128 x 64, reduced over 128 tokens)
//           with the MMA (the operands read along tokens / vocabulary rows come through transposed ldmatrix)
//           and adds them to the fp32 gradients with atomics (8-byte ones for column pairs on sm_90): every
//           (token, depth) element gets one add per vocabulary tile, every (vocabulary row, depth) element
//           one per token tile (each block starts at its own chunk, so blocks running together rarely add to
//           the same element at once). The order of the adds varies from run to run, so gradients are not
//           bitwise reproducible (the loss and lse are).
//
// Rows past T / V and depth past D are zero-filled in shared memory and never written. Operands whose rows are
// 16-byte aligned (D a multiple of 8 and aligned base pointers) load with cp.async, others element by element.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include "common/gemm_sm80.cuh"
#include "loss/loss_cpu.h"
#include "loss/loss_cuda.h"
#include "loss/loss_mma_plan.h"

namespace cm3leon::loss::mma {

template <typename T>
using Tile = gemm_sm80::TileConfig<T, kTileTokens, kTileVocab>;

// One holder's online statistics of a row, merged at the end of the forward.
struct RowStats {
  float max, sum_exp, sum;
};

// max that propagates NaN (fmaxf drops it), so a NaN logit reaches lse and is reported as not finite.
__device__ __forceinline__ float max_nan(float a, float b) { return (a != a || b != b) ? a + b : fmaxf(a, b); }

// Merges (m2, s2) into the online log-sum-exp state (m, s): s is the sum of exp(x - m).
__device__ __forceinline__ void merge_lse(float& m, float& s, float m2, float s2) {
  const float mn = max_nan(m, m2);
  s = (m == -INFINITY ? 0.f : s * __expf(m - mn)) + (m2 == -INFINITY ? 0.f : s2 * __expf(m2 - mn));
  m = mn;
}

__device__ __forceinline__ float softcapped(float z, float softcap) {
  return softcap > 0.f ? softcap * tanhf(z / softcap) : z;
}

template <typename T>
bool rows_aligned(const void* hidden, const void* weight, int64_t dim) {
  const auto aligned16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return aligned16(hidden) && aligned16(weight) && dim % Tile<T>::kVec == 0;
}

// (row, column) of every accumulator element of this thread over a (kM, kN) product of Tile<T>::TiledMma.
template <typename T, int kM, int kN>
__device__ __forceinline__ auto acc_coords() {
  using namespace cute;
  typename Tile<T>::TiledMma tiled_mma;
  return tiled_mma.get_thread_slice(threadIdx.x).partition_C(make_identity_tensor(Shape<Int<kM>, Int<kN>>{}));
}

// The pipeline's operands at the start of the dynamic shared memory: hidden rows [t0, t0 + 128) and the
// weight rows of the current vocabulary tile, (row, depth, stage) each.
template <typename T>
struct Staged {
  using Config = Tile<T>;
  using Element = typename Config::Element;
  Element* h;
  Element* w;

  __device__ explicit Staged(unsigned char* smem)
      : h(reinterpret_cast<Element*>(smem)), w(h + Config::kElemsA) {}
  __device__ auto hidden() const { return cute::make_tensor(cute::make_smem_ptr(h), typename Config::SmemLayoutA{}); }
  __device__ auto weight() const { return cute::make_tensor(cute::make_smem_ptr(w), typename Config::SmemLayoutB{}); }
  __device__ void* end() const { return w + Config::kElemsB; }

  // Issues the copies of depth chunk `chunk` of hidden rows [t0, ...) and weight rows [v0, ...) into `stage`.
  __device__ void load(const Element* hidden_rows, const Element* weight_rows, const LossConfig& cfg, bool aligned,
                       int64_t t0, int64_t v0, int64_t chunk, int stage) const {
    const int64_t col0 = chunk * Config::kDepth;
    gemm_sm80::load_chunk<Config, Config::kRows>(hidden_rows, cfg.tokens, cfg.dim, cfg.dim, aligned, t0, col0, h,
                                                 typename Config::SmemLayoutA{}, stage);
    gemm_sm80::load_chunk<Config, Config::kCols>(weight_rows, cfg.vocab, cfg.dim, cfg.dim, aligned, v0, col0, w,
                                                 typename Config::SmemLayoutB{}, stage);
  }
};

template <typename T>
__global__ void __launch_bounds__(Tile<T>::kThreads, 1)
    forward_kernel(const typename Tile<T>::Element* hidden, const typename Tile<T>::Element* weight,
                   const int64_t* targets, LossConfig cfg, bool aligned, int64_t tiles_per_split,
                   Partial* partials) {
  using namespace cute;
  using Config = Tile<T>;
  constexpr int kTokens = Config::kRows, kVocab = Config::kCols, kDepth = Config::kDepth;

  extern __shared__ __align__(128) unsigned char smem[];
  const Staged<T> staged(smem);
  Tensor sH = staged.hidden();
  Tensor sW = staged.weight();
  float* target_logit = static_cast<float*>(staged.end());                           // [kTokens]
  RowStats* stats = reinterpret_cast<RowStats*>(smem);  // [kTokens][2 warps], over the finished pipeline
  static_assert(2 * kTokens * sizeof(RowStats) <= Config::kSmemBytes, "the merge area fits the pipeline's");

  const int64_t t0 = int64_t(blockIdx.x) * kTokens;
  const int64_t chunks = cfg.dim > 0 ? (cfg.dim + kDepth - 1) / kDepth : 1;  // D = 0: one chunk of zeros
  const int64_t tile_begin = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile_end = min((cfg.vocab + kVocab - 1) / kVocab, tile_begin + tiles_per_split);
  const int64_t iterations = (tile_end - tile_begin) * chunks;
  for (int r = threadIdx.x; r < kTokens; r += Config::kThreads) target_logit[r] = 0.f;  // the pipeline syncs

  typename Config::TiledMma tiled_mma;
  Tensor acc = partition_fragment_C(tiled_mma, Shape<Int<kTokens>, Int<kVocab>>{});  // (MMA, MMA_M, MMA_N)
  const auto tCcC = acc_coords<T, kTokens, kVocab>();
  // The m16n8 accumulator holds (row, col), (row, col + 1), (row + 8, col), (row + 8, col + 1): value
  // c + 2 h of (m, n) is row slot 2 m + h and column (c, n).
  static_assert(decltype(size<0>(acc))::value == 4, "expected the m16n8 accumulator fragment");
  constexpr int kMmaM = decltype(size<1>(acc))::value, kMmaN = decltype(size<2>(acc))::value;
  constexpr int kSlots = 2 * kMmaM;
  static_assert(Config::kThreads * kSlots == kTokens * 8, "a row has 8 holders: 4 quad lanes x 2 warps");

  float row_max[kSlots], row_sum_exp[kSlots], row_sum[kSlots];
  int64_t target[kSlots];
  CUTE_UNROLL
  for (int slot = 0; slot < kSlots; ++slot) {
    const int64_t t = t0 + get<0>(tCcC(2 * (slot % 2), slot / 2, 0));
    target[slot] = t < cfg.tokens ? targets[t] : cfg.ignore_index;
    row_max[slot] = -INFINITY;
    row_sum_exp[slot] = row_sum[slot] = 0.f;
  }

  auto load = [&](int64_t it, int stage) {
    staged.load(hidden, weight, cfg, aligned, t0, (tile_begin + it / chunks) * kVocab, it % chunks, stage);
  };

  // Folds the finished logits of the vocabulary tile at v0 into the row statistics (one rescale per tile).
  auto fold = [&](int64_t v0) {
    CUTE_UNROLL
    for (int slot = 0; slot < kSlots; ++slot) {
      const int m = slot / 2, h = slot % 2;
      const int row = get<0>(tCcC(2 * h, m, 0));
      float tile_max = -INFINITY;
      CUTE_UNROLL
      for (int n = 0; n < kMmaN; ++n) {
        CUTE_UNROLL
        for (int c = 0; c < 2; ++c) {
          const int64_t v = v0 + get<1>(tCcC(c, 0, n));
          float& z = acc(c + 2 * h, m, n);
          z = softcapped(z, cfg.softcap);
          if (v < cfg.vocab) {
            tile_max = max_nan(tile_max, z);
            row_sum[slot] += z;
            if (v == target[slot]) target_logit[row] = z;
          } else {
            z = -INFINITY;
          }
        }
      }
      if (tile_max == -INFINITY) continue;  // no column of this tile is in the vocabulary (or all are -inf)
      float tile_sum = 0.f;
      CUTE_UNROLL
      for (int n = 0; n < kMmaN; ++n) {
        CUTE_UNROLL
        for (int c = 0; c < 2; ++c) tile_sum += __expf(acc(c + 2 * h, m, n) - tile_max);
      }
      merge_lse(row_max[slot], row_sum_exp[slot], tile_max, tile_sum);
    }
  };

  clear(acc);
  gemm_sm80::run_pipeline<Config::kStages>(iterations, load, [&](int64_t it, int stage) {
    gemm_sm80::mma_chunk<Config>(sH, sW, acc, stage);
    if ((it + 1) % chunks == 0) {
      fold((tile_begin + it / chunks) * kVocab);
      clear(acc);
    }
  });

  // Merge the 4 lanes of each quad, then the quads of the 2 warps along the vocabulary through shared memory
  // (warp w is (w % 4, w / 4) in the 4 x 2 warp layout; tests/loss_mma_layout_check.cu checks the ownership).
  const int warp_n = threadIdx.x / 32 / 4;
  CUTE_UNROLL
  for (int slot = 0; slot < kSlots; ++slot) {
    CUTE_UNROLL
    for (int offset = 1; offset < 4; offset *= 2) {
      const float m2 = __shfl_xor_sync(0xffffffffu, row_max[slot], offset);
      const float s2 = __shfl_xor_sync(0xffffffffu, row_sum_exp[slot], offset);
      row_sum[slot] += __shfl_xor_sync(0xffffffffu, row_sum[slot], offset);
      merge_lse(row_max[slot], row_sum_exp[slot], m2, s2);
    }
    if (threadIdx.x % 4 == 0)
      stats[2 * get<0>(tCcC(2 * (slot % 2), slot / 2, 0)) + warp_n] = {row_max[slot], row_sum_exp[slot],
                                                                        row_sum[slot]};
  }
  __syncthreads();
  for (int r = threadIdx.x; r < kTokens; r += Config::kThreads) {
    const int64_t t = t0 + r;
    if (t >= cfg.tokens) continue;
    RowStats s = stats[2 * r];
    merge_lse(s.max, s.sum_exp, stats[2 * r + 1].max, stats[2 * r + 1].sum_exp);
    partials[blockIdx.y * cfg.tokens + t] = {s.max, s.sum_exp, s.sum + stats[2 * r + 1].sum, target_logit[r]};
  }
}

// Per token: merges the splits' Partials in split order into lse and w_t l_t (0 where ignored). The target
// logit is in one split; the others hold 0. (A template only so that each storage type's translation unit
// has its own instance.)
template <typename T>
__global__ void finish_kernel(const Partial* partials, int splits, const int64_t* targets, const float* loss_weights,
                              LossConfig cfg, float* lse, float* loss) {
  for (int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; t < cfg.tokens;
       t += int64_t(gridDim.x) * blockDim.x) {
    Partial p = partials[t];
    for (int s = 1; s < splits; ++s) {
      const Partial q = partials[s * cfg.tokens + t];
      merge_lse(p.max, p.sum_exp, q.max, q.sum_exp);
      p.sum += q.sum;
      p.target += q.target;
    }
    const float l = p.max + logf(p.sum_exp);
    lse[t] = l;
    const int64_t y = targets[t];
    const float w = loss_weights ? loss_weights[t] : 1.f, eps = cfg.label_smoothing;
    loss[t] = y == cfg.ignore_index
                  ? 0.f
                  : w * ((1.f - eps) * (l - p.target) + eps * (l - p.sum / float(cfg.vocab)) + cfg.z_loss * l * l);
  }
}

// acc += A B^T for whole tiles in shared memory: sA (M, K) and sB (N, K) views (possibly transposed ones, read
// with the matching ldmatrix atoms CopyA / CopyB), one MMA-deep k slice at a time.
template <typename Config, typename CopyA, typename CopyB, typename SA, typename SB, typename Acc>
__device__ __forceinline__ void mma_tiles(const SA& sA, const SB& sB, Acc& acc) {
  using namespace cute;
  using Element = typename Config::Element;
  typename Config::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(threadIdx.x);
  // Register fragments sized from unswizzled layouts of the same shapes.
  Tensor rA = thr_mma.partition_fragment_A(make_tensor(sA.data(), make_layout(shape(sA))));
  Tensor rB = thr_mma.partition_fragment_B(make_tensor(sB.data(), make_layout(shape(sB))));
  auto copy_a = make_tiled_copy_A(Copy_Atom<CopyA, Element>{}, tiled_mma);
  auto copy_b = make_tiled_copy_B(Copy_Atom<CopyB, Element>{}, tiled_mma);
  auto thr_a = copy_a.get_thread_slice(threadIdx.x);
  auto thr_b = copy_b.get_thread_slice(threadIdx.x);
  Tensor tsA = thr_a.partition_S(sA);
  Tensor tsB = thr_b.partition_S(sB);
  Tensor trA = thr_a.retile_D(rA);
  Tensor trB = thr_b.retile_D(rB);
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    copy(copy_a, tsA(_, _, k), trA(_, _, k));
    copy(copy_b, tsB(_, _, k), trB(_, _, k));
    gemm(tiled_mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// out[row0 + r, col0 + c] += scale * acc for the accumulator fragment acc with coordinates (r, c), inside the
// [rows, cols] fp32 matrix out. Values 2j and 2j + 1 of an m16n8 fragment are columns c, c + 1 (c even) of one
// row: on sm_90 they go as one 8-byte atomic when cols is even (the pair is then aligned and inside).
template <typename Acc, typename Coords>
__device__ __forceinline__ void atomic_add_tile(float* out, int64_t rows, int64_t cols, int64_t row0, int64_t col0,
                                                const Acc& acc, const Coords& coords, float scale) {
  using namespace cute;
  CUTE_UNROLL
  for (int i = 0; i < size(acc); i += 2) {
    const int64_t r = row0 + get<0>(coords(i)), c = col0 + get<1>(coords(i));
    if (r >= rows || c >= cols) continue;
    float* p = out + r * cols + c;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    if (cols % 2 == 0) {
      atomicAdd(reinterpret_cast<float2*>(p), make_float2(acc(i) * scale, acc(i + 1) * scale));
      continue;
    }
#endif
    atomicAdd(p, acc(i) * scale);
    if (c + 1 < cols) atomicAdd(p + 1, acc(i + 1) * scale);
  }
}

// Shared-memory layouts of the gradient kernel beyond the pipeline's: G and the transposed views.
template <typename T>
struct GradientLayouts {
  using Config = Tile<T>;
  static constexpr int kTokens = Config::kRows, kVocab = Config::kCols, kDepth = Config::kDepth;
  using G = decltype(cute::tile_to_shape(typename Config::SmemAtom{},
                                         cute::Shape<cute::Int<kTokens>, cute::Int<kVocab>>{}));
  // (vocab row, token) -> G's element.
  using Gt = decltype(cute::composition(
      G{}, cute::make_layout(cute::Shape<cute::Int<kVocab>, cute::Int<kTokens>>{}, cute::GenRowMajor{})));
  // (depth, row, stage) -> the staged operand's element: H and W read along their rows.
  template <int kRows>
  using StagedT = decltype(cute::make_layout(
      cute::Shape<cute::Int<kDepth>, cute::Int<kRows>, cute::Int<Config::kStages>>{},
      cute::Stride<cute::Int<kRows>, cute::_1, cute::Int<kRows * kDepth>>{}));
  using Ht = decltype(cute::composition(typename Config::SmemLayoutA{}, StagedT<kTokens>{}));
  using Wt = decltype(cute::composition(typename Config::SmemLayoutB{}, StagedT<kVocab>{}));
  static constexpr int kSmemBytes = Config::kSmemBytes + kTokens * kVocab * int(sizeof(typename Config::Element)) +
                                    kTokens * int(4 * sizeof(float) + sizeof(int64_t)) + 16;
};

template <typename T>
__global__ void __launch_bounds__(Tile<T>::kThreads, 1)
    gradient_kernel(const typename Tile<T>::Element* hidden, const typename Tile<T>::Element* weight,
                    const int64_t* targets, LossConfig cfg, bool aligned, const float* lse, const float* a,
                    const float* b, const float* e, float* grad_hidden, float* grad_weight) {
  using namespace cute;
  using Config = Tile<T>;
  using Layouts = GradientLayouts<T>;
  using Element = typename Config::Element;
  constexpr int kTokens = Config::kRows, kVocab = Config::kCols, kDepth = Config::kDepth;

  extern __shared__ __align__(128) unsigned char smem[];
  const Staged<T> staged(smem);
  Element* smem_g = static_cast<Element*>(staged.end());
  Tensor sH = staged.hidden();
  Tensor sW = staged.weight();
  Tensor sHt = make_tensor(make_smem_ptr(staged.h), typename Layouts::Ht{});        // (depth, token, stage)
  Tensor sWt = make_tensor(make_smem_ptr(staged.w), typename Layouts::Wt{});        // (depth, vocab row, stage)
  Tensor sG = make_tensor(make_smem_ptr(smem_g), typename Layouts::G{});            // (token, vocab row)
  Tensor sGt = make_tensor(make_smem_ptr(smem_g), typename Layouts::Gt{});          // (vocab row, token)
  int64_t* row_target = reinterpret_cast<int64_t*>(smem_g + kTokens * kVocab);
  float* row_lse = reinterpret_cast<float*>(row_target + kTokens);
  float* row_a = row_lse + kTokens;
  float* row_b = row_a + kTokens;
  float* row_e = row_b + kTokens;
  unsigned* tile_max_bits = reinterpret_cast<unsigned*>(row_e + kTokens);

  const int64_t t0 = int64_t(blockIdx.x) * kTokens, v0 = int64_t(blockIdx.y) * kVocab;
  const int64_t chunks = (cfg.dim + kDepth - 1) / kDepth;
  // Per-token data, ordered before its use by the pipeline's first __syncthreads.
  for (int r = threadIdx.x; r < kTokens; r += Config::kThreads) {
    const int64_t t = t0 + r;
    const bool live = t < cfg.tokens;
    row_target[r] = live ? targets[t] : cfg.ignore_index;
    row_lse[r] = live ? lse[t] : 0.f;
    row_a[r] = live ? a[t] : 0.f;
    row_b[r] = live ? b[t] : 0.f;
    row_e[r] = live ? e[t] : 0.f;
  }
  if (threadIdx.x == 0) *tile_max_bits = 0u;

  auto load = [&](int64_t chunk, int stage) { staged.load(hidden, weight, cfg, aligned, t0, v0, chunk, stage); };

  // 1. The tile's logits.
  typename Config::TiledMma tiled_mma;
  Tensor acc = partition_fragment_C(tiled_mma, Shape<Int<kTokens>, Int<kVocab>>{});
  clear(acc);
  gemm_sm80::run_pipeline<Config::kStages>(
      chunks, load, [&](int64_t, int stage) { gemm_sm80::mma_chunk<Config>(sH, sW, acc, stage); });

  // 2. G = dl/dz = (a p - e - b [v == y]) times the softcap's slope; 0 outside the tensors.
  const auto tCcC = acc_coords<T, kTokens, kVocab>();
  float local_max = 0.f;
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) {
    const int r = get<0>(tCcC(i));
    const int64_t v = v0 + get<1>(tCcC(i));
    float grad = 0.f;
    if (t0 + r < cfg.tokens && v < cfg.vocab) {
      const float z = softcapped(acc(i), cfg.softcap);
      grad = row_a[r] * __expf(z - row_lse[r]) - row_e[r] - (v == row_target[r] ? row_b[r] : 0.f);
      if (cfg.softcap > 0.f) grad *= 1.f - (z / cfg.softcap) * (z / cfg.softcap);
    }
    acc(i) = grad;
    local_max = fmaxf(local_max, fabsf(grad));
  }
  for (int offset = 16; offset > 0; offset /= 2)
    local_max = fmaxf(local_max, __shfl_xor_sync(0xffffffffu, local_max, offset));
  if (threadIdx.x % 32 == 0) atomicMax(tile_max_bits, __float_as_uint(local_max));  // non-negative: bits order
  __syncthreads();
  const float tile_max = __uint_as_float(*tile_max_bits);
  if (tile_max == 0.f) return;  // nothing to add (ignored tokens, zero weights); uniform over the block
  int exponent;
  frexpf(tile_max, &exponent);  // tile_max < 2^exponent
  const int shift = min(15 - exponent, 126);  // |G| 2^shift < 2^15, inside fp16's range; exact in fp32
  const float scale = ldexpf(1.f, shift), unscale = ldexpf(1.f, -shift);
  Tensor tGsG = tiled_mma.get_thread_slice(threadIdx.x).partition_C(sG);
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) tGsG(i) = static_cast<Element>(acc(i) * scale);

  // 3. Per depth chunk: grad_hidden += G W, grad_weight += G^T H (the first iteration's sync publishes G).
  // Blocks start at different chunks: the blocks running at the same time share a token or vocabulary tile,
  // and would otherwise add to the same gradient elements at the same moment.
  using LdsmN = cute::SM75_U32x4_LDSM_N;
  using LdsmT = cute::SM75_U16x8_LDSM_T;
  const auto tHc = acc_coords<T, kTokens, kDepth>();
  const auto tWc = acc_coords<T, kVocab, kDepth>();
  const int64_t first = (int64_t(blockIdx.x) + blockIdx.y) % chunks;
  auto load_rotated = [&](int64_t it, int stage) { load((first + it) % chunks, stage); };
  gemm_sm80::run_pipeline<Config::kStages>(chunks, load_rotated, [&](int64_t it, int stage) {
    const int64_t d0 = (first + it) % chunks * kDepth;
    Tensor acc_h = partition_fragment_C(tiled_mma, Shape<Int<kTokens>, Int<kDepth>>{});
    Tensor acc_w = partition_fragment_C(tiled_mma, Shape<Int<kVocab>, Int<kDepth>>{});
    clear(acc_h);
    clear(acc_w);
    mma_tiles<Config, LdsmN, LdsmT>(sG, sWt(_, _, stage), acc_h);
    mma_tiles<Config, LdsmT, LdsmT>(sGt, sHt(_, _, stage), acc_w);
    atomic_add_tile(grad_hidden, cfg.tokens, cfg.dim, t0, d0, acc_h, tHc, unscale);
    atomic_add_tile(grad_weight, cfg.vocab, cfg.dim, v0, d0, acc_w, tWc, unscale);
  });
}

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

template <typename T>
cudaError_t forward(const void* hidden, const void* weight, const int64_t* targets, const float* loss_weights,
                    const LossConfig& cfg, float* lse, float* loss, void* workspace, cudaStream_t stream) {
  using Element = typename Tile<T>::Element;
  if (cfg.tokens == 0) return cudaSuccess;
  ForwardPlan plan;
  cudaError_t err = plan_forward(cfg, &plan);
  if (err != cudaSuccess) return err;
  if (plan.token_tiles > 0x7fffffff) return cudaErrorInvalidConfiguration;
  constexpr int smem = Tile<T>::kSmemBytes + kTileTokens * int(sizeof(float));  // + target logits
  err = allow_smem(forward_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  auto* partials = static_cast<Partial*>(workspace);
  forward_kernel<T><<<dim3(unsigned(plan.token_tiles), unsigned(plan.splits)), Tile<T>::kThreads, smem, stream>>>(
      static_cast<const Element*>(hidden), static_cast<const Element*>(weight), targets, cfg,
      rows_aligned<T>(hidden, weight, cfg.dim), plan.tiles_per_split, partials);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int64_t blocks = std::min<int64_t>((cfg.tokens + 255) / 256, 4096);
  finish_kernel<T><<<unsigned(blocks), 256, 0, stream>>>(partials, plan.splits, targets, loss_weights, cfg, lse, loss);
  return cudaGetLastError();
}

template <typename T>
cudaError_t gradients(const void* hidden, const void* weight, const int64_t* targets, const LossConfig& cfg,
                      const float* lse, const float* a, const float* b, const float* e, float* grad_hidden,
                      float* grad_weight, cudaStream_t stream) {
  using Element = typename Tile<T>::Element;
  if (cfg.tokens == 0 || cfg.dim == 0) return cudaSuccess;
  const int64_t token_tiles = (cfg.tokens + Tile<T>::kRows - 1) / Tile<T>::kRows;
  const int64_t vocab_tiles = (cfg.vocab + Tile<T>::kCols - 1) / Tile<T>::kCols;
  if (token_tiles > 0x7fffffff || vocab_tiles > 65535) return cudaErrorInvalidConfiguration;
  constexpr int smem = GradientLayouts<T>::kSmemBytes;
  const cudaError_t err = allow_smem(gradient_kernel<T>, smem);
  if (err != cudaSuccess) return err;
  gradient_kernel<T><<<dim3(unsigned(token_tiles), unsigned(vocab_tiles)), Tile<T>::kThreads, smem, stream>>>(
      static_cast<const Element*>(hidden), static_cast<const Element*>(weight), targets, cfg,
      rows_aligned<T>(hidden, weight, cfg.dim), lse, a, b, e, grad_hidden, grad_weight);
  return cudaGetLastError();
}

}  // namespace cm3leon::loss::mma

// Defines forward_<name>_cuda and gradients_<name>_cuda (loss_cuda.h) for storage type T, in one translation
// unit per type.
#define CM3LEON_LOSS_MMA_ENTRY_POINTS(name, T)                                                                     \
  namespace cm3leon::loss {                                                                                        \
  cudaError_t forward_##name##_cuda(CM3LEON_LOSS_CUDA_FORWARD_PARAMS) {                                            \
    return mma::forward<T>(hidden, weight, targets, loss_weights, cfg, lse, loss, workspace, stream);              \
  }                                                                                                                \
  cudaError_t gradients_##name##_cuda(CM3LEON_LOSS_CUDA_GRADIENT_PARAMS) {                                         \
    return mma::gradients<T>(hidden, weight, targets, cfg, lse, a, b, e, grad_hidden_f32, grad_weight_f32, stream); \
  }                                                                                                                \
  }
