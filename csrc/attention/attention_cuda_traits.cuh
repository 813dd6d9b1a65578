// Shared, torch-free building blocks of the CUDA attention kernels (forward, decode, backward).
//
//   AttnParams         one call: raw pointers, token strides, lengths, scale, mask (causal, local window,
//                      softcap, ALiBi). Dense, varlen (device cu_seqlens) and KV-cache (device cache_seqlens)
//                      calls all fill this one struct; BackwardParams extends it with the backward's tensors.
//                      Both live in attention_cuda_params.cuh (CuTe-free, for the SIMT and decode kernels).
//   SeqInfo            where batch row / document b lives in q/k/out/lse, resolved on the device and clamped
//                      to the tensors' token counts, so bad device-side lengths can never index out of bounds;
//                      which keys each query sees. ScoreMod: a raw score to the softmax's score (scale, softcap,
//                      ALiBi).
//   Sm80Traits<...>    CuTe tile configuration of the sm80 tensor-core kernels: mma.sync m16n8k16 TiledMMA
//                      (warps stacked along M), swizzled smem layouts for Q/K/V and V^T, cp.async gmem->smem
//                      copies of 16-byte chunks, ldmatrix smem->register atoms, 16-byte gmem stores for O.
//   Fragment helpers   row/column views of an mma accumulator, the accumulator-as-A-operand view (P in
//                      O += P V), fp32 -> bf16/fp16 fragment conversion, quad (4-lane) reductions.
//   Predicated copies  copy_rows_predicated: a gmem<->smem tile copy that skips rows past a length and
//                      16-byte column chunks past the head dim, clearing the smem it does not load.
//
// Conventions: scores and lse are in natural units; probabilities are exp_diff(score, max or lse) (exp2f of
// the difference times log2(e)). Rows with no visible key give out = 0 and lse = -inf.
#pragma once
#include <cstdint>
#include <cuda_runtime_api.h>

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "attention/attention_cuda_params.cuh"

namespace cm3leon::attention::cuda {

// ---- sm80 tensor-core tile configuration -----------------------------------------------------------------

template <typename Element>
struct MmaAtomFor;
template <>
struct MmaAtomFor<cutlass::bfloat16_t> {
  using type = cute::SM80_16x8x16_F32BF16BF16F32_TN;
};
template <>
struct MmaAtomFor<cutlass::half_t> {
  using type = cute::SM80_16x8x16_F32F16F16F32_TN;
};

// kHeadDim: the instantiated head dim (the call's head dim may be smaller: its columns are predicated).
// kBlockM x kBlockN: the score tile one block computes per step; kNWarps warps split the kBlockM rows.
template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, typename Element_>
struct Sm80Traits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_, kBlockM = kBlockM_, kBlockN = kBlockN_, kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kHeadDim % 32 == 0 && kBlockM % (16 * kNWarps) == 0 && kBlockN % 16 == 0);

  using TiledMma = cute::TiledMMA<cute::MMA_Atom<typename MmaAtomFor<Element>::type>,
                                  cute::Layout<cute::Shape<cute::Int<kNWarps>, cute::_1, cute::_1>>,
                                  cute::Tile<cute::Int<16 * kNWarps>, cute::_16, cute::_16>>;

  // Smem rows are stored in 64- (or 32-) column panels with an XOR swizzle so ldmatrix is conflict-free.
  static constexpr int kBlockKSmem = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kSwizzle = kBlockKSmem == 32 ? 2 : 3;
  using SmemLayoutAtom = decltype(cute::composition(
      cute::Swizzle<kSwizzle, 3, 3>{},
      cute::Layout<cute::Shape<cute::_8, cute::Int<kBlockKSmem>>, cute::Stride<cute::Int<kBlockKSmem>, cute::_1>>{}));
  using SmemLayoutQ =
      decltype(cute::tile_to_shape(SmemLayoutAtom{}, cute::Shape<cute::Int<kBlockM>, cute::Int<kHeadDim>>{}));
  using SmemLayoutKV =
      decltype(cute::tile_to_shape(SmemLayoutAtom{}, cute::Shape<cute::Int<kBlockN>, cute::Int<kHeadDim>>{}));
  // V read as V^T [head_dim, kBlockN] (the B operand of O += P V) through the same storage.
  using SmemLayoutVt = decltype(cute::composition(
      SmemLayoutKV{},
      cute::make_layout(cute::Shape<cute::Int<kHeadDim>, cute::Int<kBlockN>>{}, cute::GenRowMajor{})));
  using SmemLayoutVtNoSwizzle = decltype(cute::get_nonswizzle_portion(SmemLayoutVt{}));

  using SmemCopyAtom = cute::Copy_Atom<cute::SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomTransposed = cute::Copy_Atom<cute::SM75_U16x8_LDSM_T, Element>;
  using SmemCopyAtomO = cute::Copy_Atom<cute::AutoVectorizingCopyWithAssumedAlignment<32>, Element>;

  // Gmem <-> smem: each thread moves 16-byte chunks (8 elements); a row panel of kBlockKSmem columns is
  // covered by kBlockKSmem / 8 threads.
  static constexpr int kGmemThreadsPerRow = kBlockKSmem / 8;
  using GmemThreadLayout =
      cute::Layout<cute::Shape<cute::Int<kNThreads / kGmemThreadsPerRow>, cute::Int<kGmemThreadsPerRow>>,
                   cute::Stride<cute::Int<kGmemThreadsPerRow>, cute::_1>>;
  using GmemValLayout = cute::Layout<cute::Shape<cute::_1, cute::_8>>;
  using GmemTiledCopyQKV = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<cute::SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{}, GmemThreadLayout{},
      GmemValLayout{}));
  using GmemTiledCopyO = decltype(cute::make_tiled_copy(
      cute::Copy_Atom<cute::UniversalCopy<cute::uint128_t>, Element>{}, GmemThreadLayout{}, GmemValLayout{}));
  static_assert(kBlockM % (kNThreads / kGmemThreadsPerRow) == 0 && kBlockN % (kNThreads / kGmemThreadsPerRow) == 0);

  static constexpr int kSmemElems = (kBlockM + 2 * kBlockN) * kHeadDim;  // Q, K, V (O reuses Q)
  static constexpr int kSmemBytes = kSmemElems * int(sizeof(Element));
};

// ---- fragment helpers ------------------------------------------------------------------------------------

// An m16n8 accumulator fragment (MMA=4, MMA_M, MMA_N) viewed as (rows=(2, MMA_M), cols=(2, MMA_N)).
template <typename Layout>
CUTE_HOST_DEVICE auto acc_rowcol_layout(Layout acc) {
  using namespace cute;
  auto l = logical_divide(acc, Shape<_2>{});  // ((2, 2), MMA_M, MMA_N)
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// The (MMA=4, MMA_M, MMA_N) accumulator of S = Q K^T read as the A operand ((4, 2), MMA_M, MMA_N / 2) of
// the next m16n8k16 mma: two adjacent n8 tiles form one k16 slice.
template <typename Layout>
CUTE_HOST_DEVICE auto acc_as_a_layout(Layout acc) {
  using namespace cute;
  auto l = logical_divide(acc, Shape<X, X, _2>{});  // (4, MMA_M, (2, MMA_N / 2))
  return make_layout(make_layout(get<0>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

// dst = Element(src) elementwise for register fragments of equal size (vectorised conversion).
template <typename TensorSrc, typename TensorDst>
__device__ __forceinline__ void convert_fragment(const TensorSrc& src, TensorDst& dst) {
  using To = typename TensorDst::value_type;
  constexpr int N = decltype(cute::size(src))::value;
  static_assert(N == decltype(cute::size(dst))::value);
  cutlass::NumericArrayConverter<To, float, N> op;
  *reinterpret_cast<cutlass::Array<To, N>*>(cute::raw_pointer_cast(dst.data())) =
      op(*reinterpret_cast<const cutlass::Array<float, N>*>(cute::raw_pointer_cast(src.data())));
}

// Max / sum over the 4 lanes of an mma quad (the lanes that share accumulator rows).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Copies a (rows, cols) tile partitioned by a tiled copy: (CPY, CPY_M, CPY_K) source/destination and the
// identity (row, col) coordinates of the same partition. Rows >= max_rows and columns >= max_cols are not
// read; their destination is cleared (so no smem stays uninitialised and padding contributes zeros).
template <typename TiledCopy, typename TS, typename TD, typename TC>
__device__ __forceinline__ void copy_rows_predicated(const TiledCopy& tiled_copy, const TS& src, TD&& dst,
                                                     const TC& coords, int max_rows, int max_cols) {
  using namespace cute;
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    const bool row_ok = get<0>(coords(0, m, 0)) < max_rows;
    CUTE_UNROLL
    for (int kc = 0; kc < size<2>(src); ++kc) {
      if (row_ok && get<1>(coords(0, m, kc)) < max_cols) {
        cute::copy(tiled_copy, src(_, m, kc), dst(_, m, kc));
      } else {
        cute::clear(dst(_, m, kc));
      }
    }
  }
}

// Stores a register tile to gmem, skipping rows >= max_rows and column chunks >= max_cols.
template <typename TiledCopy, typename TS, typename TD, typename TC>
__device__ __forceinline__ void store_rows_predicated(const TiledCopy& tiled_copy, const TS& src, TD&& dst,
                                                      const TC& coords, int max_rows, int max_cols) {
  using namespace cute;
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    if (get<0>(coords(0, m, 0)) >= max_rows) continue;
    CUTE_UNROLL
    for (int kc = 0; kc < size<2>(src); ++kc) {
      if (get<1>(coords(0, m, kc)) < max_cols) cute::copy(tiled_copy, src(_, m, kc), dst(_, m, kc));
    }
  }
}

}  // namespace cm3leon::attention::cuda
