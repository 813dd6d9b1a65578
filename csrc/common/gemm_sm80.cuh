// Tensor-core pieces (CuTe, sm_80 mma.sync; also run as is on sm_90) shared by the kernels that stream tiles
// of one matrix B past a block of rows of another matrix A and reduce every A B^T tile in an epilogue instead
// of writing the product: the nearest-code search (z . c^T, vq/vq_nearest_gemm.cuh) and the fused linear +
// cross-entropy (hidden . weight^T, loss/loss_mma.cuh).
//
//   GemmTraits<T>       per storage type: the MMA atom, the shared->register copy, the MMA depth.
//   TileConfig<T, R, C> a block of R rows of A x C rows of B, 8 warps (4 along rows x 2 along columns),
//                       depth chunks of 128 bytes per row in swizzled (bank-conflict-free) shared memory, a
//                       3-stage pipeline.
//   load_chunk          global -> one pipeline stage: 16-byte cp.async, or guarded element loads when the
//                       rows are not 16-byte aligned (any depth, any base address).
//   run_pipeline        the multistage cp.async loop over (tile, depth chunk) iterations.
//   mma_chunk           acc += A_chunk B_chunk^T for one staged chunk.
#pragma once
#include <cstdint>

#include <cute/tensor.hpp>
#include <cute/arch/copy_sm80.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/numeric_types.h>

namespace cm3leon::gemm_sm80 {

// Per storage type: the MMA, the shared->register copy and the MMA depth.
template <typename T>
struct GemmTraits;

// 16-bit types: their native m16n8k16 MMA (exact products, fp32 accumulation), ldmatrix.x4 loads.
template <typename Element_, typename Mma_>
struct GemmTraits16 {
  using Element = Element_;
  using Mma = Mma_;
  using SmemToReg = cute::SM75_U32x4_LDSM_N;
  static constexpr int kMmaDepth = 16;
};

template <>
struct GemmTraits<cutlass::bfloat16_t> : GemmTraits16<cutlass::bfloat16_t, cute::SM80_16x8x16_F32BF16BF16F32_TN> {};

template <>
struct GemmTraits<cutlass::half_t> : GemmTraits16<cutlass::half_t, cute::SM80_16x8x16_F32F16F16F32_TN> {};

template <>
struct GemmTraits<float> {
  using Element = cutlass::tfloat32_t;  // same bits as the fp32 input; the MMA ignores the low 13
  using Mma = cute::SM80_16x8x8_F32TF32TF32F32_TN;
  using SmemToReg = cute::UniversalCopy<cutlass::tfloat32_t>;  // 32-bit LDS, conflict-free with the swizzle
  static constexpr int kMmaDepth = 8;
};

template <typename T, int kRows_, int kCols_>
struct TileConfig {
  using Traits = GemmTraits<T>;
  using Element = typename Traits::Element;
  static constexpr int kThreads = 256;
  static constexpr int kStages = 3;
  static constexpr int kRows = kRows_;  // rows of A per block
  static constexpr int kCols = kCols_;  // rows of B per tile (columns of the product)
  static constexpr int kVec = 16 / int(sizeof(Element));  // elements per 16-byte cp.async
  static constexpr int kDepth = 8 * kVec;                  // elements per 128-byte chunk of a row
  static constexpr int kVecShift = sizeof(Element) == 2 ? 3 : 2;

  // 8 rows x 128 bytes, the 16-byte column chunks XOR-ed with the row: ldmatrix/LDS hit 32 distinct banks.
  using SmemAtom = decltype(cute::composition(
      cute::Swizzle<3, kVecShift, 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::Int<kDepth>>, cute::Stride<cute::Int<kDepth>, cute::_1>>{}));
  using SmemLayoutA = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kRows>, cute::Int<kDepth>, cute::Int<kStages>>{}));
  using SmemLayoutB = decltype(cute::tile_to_shape(
      SmemAtom{}, cute::Shape<cute::Int<kCols>, cute::Int<kDepth>, cute::Int<kStages>>{}));
  // Warps 4 x 2; each warp owns 16 columns of a 32-wide permutation tile so the B loads are full ldmatrix.x4.
  using TiledMma = cute::TiledMMA<cute::MMA_Atom<typename Traits::Mma>, cute::Layout<cute::Shape<cute::_4, cute::_2,
                                                                                               cute::_1>>,
                                  cute::Tile<cute::_64, cute::_32, cute::Int<Traits::kMmaDepth>>>;
  static constexpr int kElemsA = int(cute::cosize(SmemLayoutA{}));
  static constexpr int kElemsB = int(cute::cosize(SmemLayoutB{}));
  static constexpr int kSmemBytes = (kElemsA + kElemsB) * int(sizeof(Element));
};

// Global -> shared for one pipeline stage: rows [row0, row0 + kTileRows) x columns [col0, col0 + kDepth) of a
// row-major matrix with `rows` rows, `cols` valid columns and row stride `ld`, into `smem` laid out as
// (row, column, stage). Rows past `rows` and columns past `cols` are zero-filled. `aligned` (base address and
// ld * sizeof(Element) multiples of 16 bytes, cols == ld) takes the 16-byte cp.async path (src-size 0 reads
// nothing; the pointer stays in bounds anyway); otherwise each element is loaded on its own (synchronous
// stores: the pipeline's __syncthreads orders them like the asynchronous ones).
template <typename Config, int kTileRows, typename Layout>
__device__ __forceinline__ void load_chunk(const typename Config::Element* src, int64_t rows, int64_t cols,
                                           int64_t ld, bool aligned, int64_t row0, int64_t col0,
                                           typename Config::Element* smem, Layout layout, int stage) {
  using Element = typename Config::Element;
  constexpr int kVec = Config::kVec, kVecsPerRow = Config::kDepth / kVec;
  CUTE_UNROLL
  for (int i = int(threadIdx.x); i < kTileRows * kVecsPerRow; i += Config::kThreads) {
    const int r = i / kVecsPerRow, c = (i % kVecsPerRow) * kVec;
    const int64_t row = row0 + r, col = col0 + c;
    auto* dst = reinterpret_cast<cute::uint128_t*>(smem + layout(r, c, stage));
    if (aligned) {
      const bool ok = row < rows && col < cols;
      const Element* from = ok ? src + row * ld + col : src;
      cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
          *reinterpret_cast<const cute::uint128_t*>(from), *dst, ok);
    } else {
      alignas(16) Element vals[kVec];
      CUTE_UNROLL
      for (int j = 0; j < kVec; ++j)
        vals[j] = (row < rows && col + j < cols) ? src[row * ld + col + j] : Element(0.f);
      *dst = *reinterpret_cast<const cute::uint128_t*>(vals);
    }
  }
}

// Runs `iterations` steps through a kStages-deep cp.async pipeline: load(it, stage) issues step it's copies,
// compute(it, stage) consumes them. One commit group per step, empty ones included, so the wait count is
// fixed. Ends with every copy landed and every thread past its last compute (the stages may be reused).
template <int kStages, typename Load, typename Compute>
__device__ __forceinline__ void run_pipeline(int64_t iterations, Load&& load, Compute&& compute) {
  CUTE_UNROLL
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < iterations) load(int64_t(s), s);
    cute::cp_async_fence();
  }
  for (int64_t it = 0; it < iterations; ++it) {
    cute::cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `it` is visible to all; everyone is done with the stage refilled below
    const int64_t next = it + kStages - 1;
    if (next < iterations) load(next, int(next % kStages));
    cute::cp_async_fence();
    compute(it, int(it % kStages));
  }
  cute::cp_async_wait<0>();
  __syncthreads();
}

// acc (the (MMA, MMA_M, MMA_N) fragment of Config::TiledMma over kRows x kCols) += A B^T over the depth chunk
// in pipeline stage `stage` of sA (kRows, kDepth, stage) and sB (kCols, kDepth, stage).
template <typename Config, typename SA, typename SB, typename Acc>
__device__ __forceinline__ void mma_chunk(const SA& sA, const SB& sB, Acc& acc, int stage) {
  using namespace cute;
  using Element = typename Config::Element;
  typename Config::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(threadIdx.x);
  Tensor tCrA = thr_mma.partition_fragment_A(sA(_, _, 0));  // (MMA, MMA_M, MMA_K)
  Tensor tCrB = thr_mma.partition_fragment_B(sB(_, _, 0));  // (MMA, MMA_N, MMA_K)
  auto s2r_a = make_tiled_copy_A(Copy_Atom<typename Config::Traits::SmemToReg, Element>{}, tiled_mma);
  auto s2r_b = make_tiled_copy_B(Copy_Atom<typename Config::Traits::SmemToReg, Element>{}, tiled_mma);
  auto s2r_thr_a = s2r_a.get_thread_slice(threadIdx.x);
  auto s2r_thr_b = s2r_b.get_thread_slice(threadIdx.x);
  Tensor tXsA = s2r_thr_a.partition_S(sA);  // (CPY, CPY_M, CPY_K, stage)
  Tensor tXrA = s2r_thr_a.retile_D(tCrA);
  Tensor tXsB = s2r_thr_b.partition_S(sB);
  Tensor tXrB = s2r_thr_b.retile_D(tCrB);
  CUTE_UNROLL
  for (int kb = 0; kb < size<2>(tCrA); ++kb) {
    copy(s2r_a, tXsA(_, _, kb, stage), tXrA(_, _, kb));
    copy(s2r_b, tXsB(_, _, kb, stage), tXrB(_, _, kb));
    gemm(tiled_mma, tCrA(_, _, kb), tCrB(_, _, kb), acc);
  }
}

}  // namespace cm3leon::gemm_sm80
