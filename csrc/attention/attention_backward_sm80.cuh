// Attention backward on tensor cores (SM80 mma.sync, also run as is on SM90), FlashAttention-2 structure.
//
// A block owns kBlockN keys of one kv head at a time (and strides on to further key blocks of a document
// longer than max_seqlen_k): it keeps K and V in shared memory and dK, dV in registers while it sweeps
// every (query head of the GQA group, block of kBlockM queries that can see its keys). Per step:
//   S = Q K^T, dP = dO V^T                       (fp32 accumulators, [kBlockM, kBlockN])
//   P = e^(mod(S) - lse), dS = P (dP - D)        (recomputed from the saved lse; masked -> 0)
//   dV += P^T dO, dK += dS^T Q                   (P, dS staged in shared memory as 16-bit, read transposed)
//   dQ_accum += dS K                             (fp32 atomics: other key blocks add to the same rows)
// Looping over the query heads of a group inside the block sums the GQA gradients of dK/dV in registers, so
// they need neither atomics nor a per-query-head workspace (the cost: heads_q / heads_kv fewer blocks).
// Operands go global -> shared with 16-byte cp.async (rows and head-dim columns past the ends are
// zero-filled, so one instantiation serves every head dim up to kHeadDim) and shared -> registers with
// ldmatrix (transposed ldmatrix for the operands read along tokens). The next step's Q / dO load is issued
// before the dQ product so it overlaps with it.
#pragma once
#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "attention/attention_backward_common.cuh"
#include "attention/attention_backward_kernels.h"

namespace cm3leon::attention::bwd {

using namespace cute;

template <int kHeadDim_, typename Element_>
struct Sm80Traits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;  // multiple of 64
  static_assert(kHeadDim % 64 == 0, "head-dim buckets are multiples of 64 (one swizzled row atom wide)");
  static constexpr int kBlockM = 64;          // queries per step
  static constexpr int kBlockN = 64;          // keys per block
  static constexpr int kThreads = 256;        // 8 warps

  using Mma = MMA_Atom<std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                          SM80_16x8x16_F32F16F16F32_TN, SM80_16x8x16_F32BF16BF16F32_TN>>;
  // S, dP on [kBlockM, kBlockN]: warps 2 x 4, each 16 x 16 per tile.
  using MmaSdP = TiledMMA<Mma, Layout<Shape<_2, _4, _1>>, Tile<_32, _64, _16>>;
  // dV, dK on [kBlockN, head dim] and dQ on [kBlockM, head dim]: warps 4 x 2, each 16 x 16 per tile.
  using MmaD = TiledMMA<Mma, Layout<Shape<_4, _2, _1>>, Tile<_64, _32, _16>>;

  // Shared tiles: atoms of 8 rows x 64 elements (128 bytes), XOR-swizzled in 16-byte chunks so ldmatrix and
  // cp.async are conflict-free.
  using RowAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using LayoutQ = decltype(tile_to_shape(RowAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using LayoutK = decltype(tile_to_shape(RowAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  using LayoutPdS = decltype(tile_to_shape(RowAtom{}, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  // Transposed views ((d, token) -> the same element), for products that reduce over tokens.
  using LayoutQt = decltype(composition(LayoutQ{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockM>>{},
                                                               GenRowMajor{})));
  using LayoutKt = decltype(composition(LayoutK{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{},
                                                               GenRowMajor{})));
  using LayoutPdSt = decltype(composition(LayoutPdS{}, make_layout(Shape<Int<kBlockN>, Int<kBlockM>>{},
                                                                   GenRowMajor{})));
  // Unswizzled shapes of the transposed views, to size register fragments.
  using LayoutQtPlain = decltype(get_nonswizzle_portion(LayoutQt{}));
  using LayoutKtPlain = decltype(get_nonswizzle_portion(LayoutKt{}));
  using LayoutPdStPlain = decltype(get_nonswizzle_portion(LayoutPdSt{}));

  // Global -> shared: one 16-byte cp.async (8 elements) per thread and row chunk.
  static constexpr int kThreadsPerRow = 64 / 8;
  using GmemCopy = decltype(make_tiled_copy(
      Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, Element>{},
      Layout<Shape<Int<kThreads / kThreadsPerRow>, Int<kThreadsPerRow>>, Stride<Int<kThreadsPerRow>, _1>>{},
      Layout<Shape<_1, _8>>{}));
  using Ldsm = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using LdsmT = Copy_Atom<SM75_U16x8_LDSM_T, Element>;

  // sQ, sdO [kBlockM, d]; sK, sV [kBlockN, d]; sP, sdS [kBlockM, kBlockN]; then the step's lse and D.
  static constexpr int kTileElems = 2 * kBlockM * kHeadDim + 2 * kBlockN * kHeadDim + 2 * kBlockM * kBlockN;
  static constexpr int kSmemBytes = kTileElems * int(sizeof(Element)) + 2 * kBlockM * int(sizeof(float));
};

// Copies a [rows, cols] tile (partitioned by a tiled cp.async) into shared memory; chunks whose row or
// column lies past (rows, cols) are zero-filled instead. cols is a multiple of 8, so chunks never straddle.
template <typename Copy, typename Src, typename Dst, typename Coord>
__device__ __forceinline__ void load_tile(const Copy& copy, const Src& src, Dst& dst, const Coord& coord,
                                          int rows, int cols) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    CUTE_UNROLL
    for (int k = 0; k < size<2>(src); ++k) {
      if (get<0>(coord(0, m, k)) < rows && get<1>(coord(0, m, k)) < cols) {
        cute::copy(copy, src(_, m, k), dst(_, m, k));
      } else {
        cute::clear(dst(_, m, k));
      }
    }
  }
}

// acc += A B^T with both operands in shared memory (already partitioned for the ldmatrix copies), one
// 16-deep k slice at a time.
template <typename Acc, typename RegA, typename RegB, typename SmemA, typename SmemB, typename Mma,
          typename CopyA, typename CopyB, typename ThrA, typename ThrB>
__device__ __forceinline__ void gemm_smem(Acc& acc, RegA& ra, RegB& rb, const SmemA& sa, const SmemB& sb,
                                          const Mma& mma, const CopyA& copy_a, const CopyB& copy_b,
                                          const ThrA& thr_a, const ThrB& thr_b) {
  Tensor ra_view = thr_a.retile_D(ra);
  Tensor rb_view = thr_b.retile_D(rb);
  CUTE_UNROLL
  for (int k = 0; k < size<2>(ra); ++k) {
    cute::copy(copy_a, sa(_, _, k), ra_view(_, _, k));
    cute::copy(copy_b, sb(_, _, k), rb_view(_, _, k));
    cute::gemm(mma, ra(_, _, k), rb(_, _, k), acc);
  }
}

// dK, dV of keys [n0, n0 + kBlockN) (n0 < s.k_len) of kv head item.head_kv, and their dQ contributions.
template <typename Traits>
__device__ void backward_tile_sm80(const BackwardParams& p, const Item& item, const SeqInfo& s, int n0,
                                   char* smem_raw) {
  using Element = typename Traits::Element;
  constexpr int kM = Traits::kBlockM, kN = Traits::kBlockN, kD = Traits::kHeadDim;

  const int tid = opaque(int(threadIdx.x)), d = int(p.head_dim), group = int(p.heads_q / p.heads_kv);
  const int64_t q_row = p.heads_q * p.head_dim, k_row = p.heads_kv * p.head_dim;  // token strides

  Element* smem = reinterpret_cast<Element*>(smem_raw);
  Tensor sQ = make_tensor(make_smem_ptr(smem), typename Traits::LayoutQ{});
  Tensor sdO = make_tensor(sQ.data() + size(sQ), typename Traits::LayoutQ{});
  Tensor sK = make_tensor(sdO.data() + size(sdO), typename Traits::LayoutK{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::LayoutK{});
  Tensor sP = make_tensor(sV.data() + size(sV), typename Traits::LayoutPdS{});
  Tensor sdS = make_tensor(sP.data() + size(sP), typename Traits::LayoutPdS{});
  float* s_lse = reinterpret_cast<float*>(smem + Traits::kTileElems);
  float* s_dsum = s_lse + kM;
  Tensor sQt = make_tensor(sQ.data(), typename Traits::LayoutQt{});
  Tensor sdOt = make_tensor(sdO.data(), typename Traits::LayoutQt{});
  Tensor sKt = make_tensor(sK.data(), typename Traits::LayoutKt{});
  Tensor sPt = make_tensor(sP.data(), typename Traits::LayoutPdSt{});
  Tensor sdSt = make_tensor(sdS.data(), typename Traits::LayoutPdSt{});

  // ---- global -> shared ----
  typename Traits::GmemCopy gcopy;
  auto gthr = gcopy.get_thread_slice(tid);
  const Tensor tQc = gthr.partition_S(make_identity_tensor(Shape<Int<kM>, Int<kD>>{}));
  const Tensor tKc = gthr.partition_S(make_identity_tensor(Shape<Int<kN>, Int<kD>>{}));
  Tensor tQs = gthr.partition_D(sQ);
  Tensor tdOs = gthr.partition_D(sdO);
  Tensor tKs = gthr.partition_D(sK);
  Tensor tVs = gthr.partition_D(sV);
  const Element* q = static_cast<const Element*>(p.q);
  const Element* dout = static_cast<const Element*>(p.dout);

  // Step t: query head hk * group + t / m_count, query block m_begin + t % m_count (those that can see some
  // key of this block).
  const int m_begin = s.first_query(n0, p) / kM;
  const int m_count = max(0, (s.end_query(n0 + kN, p) + kM - 1) / kM - m_begin);
  const int steps = m_count * group;
  auto step_head = [&](int t) { return item.head_kv * group + t / m_count; };
  auto step_m0 = [&](int t) { return (m_begin + t % m_count) * kM; };

  // Issues the loads of one step's Q and dO tiles (cp.async) and writes its rows' lse and D.
  auto load_step = [&](int t) {
    const int h = step_head(t), m0 = step_m0(t);
    const int64_t off = (s.q_start + m0) * q_row + int64_t(h) * d;
    const auto shape = Shape<Int<kM>, Int<kD>>{};
    const auto stride = make_stride(q_row, _1{});
    Tensor gQ = make_tensor(make_gmem_ptr(q + off), shape, stride);
    Tensor gdO = make_tensor(make_gmem_ptr(dout + off), shape, stride);
    load_tile(gcopy, gthr.partition_S(gQ), tQs, tQc, s.q_len - m0, d);
    load_tile(gcopy, gthr.partition_S(gdO), tdOs, tQc, s.q_len - m0, d);
    cp_async_fence();
    if (tid < kM) {
      const bool row = m0 + tid < s.q_len;
      s_lse[tid] = row ? lse_for_p(p, s, h, m0 + tid) : INFINITY;
      s_dsum[tid] = row ? dsum_at(p, s, h, m0 + tid) : 0.f;
    }
  };

  // ---- shared -> registers, per product ----
  typename Traits::MmaSdP mma_sdp;
  typename Traits::MmaD mma_d;
  auto thr_sdp = mma_sdp.get_thread_slice(tid);
  auto thr_d = mma_d.get_thread_slice(tid);
  auto ld_sdp_a = make_tiled_copy_A(typename Traits::Ldsm{}, mma_sdp);
  auto ld_sdp_b = make_tiled_copy_B(typename Traits::Ldsm{}, mma_sdp);
  auto ld_d_a = make_tiled_copy_A(typename Traits::Ldsm{}, mma_d);
  auto ld_d_at = make_tiled_copy_A(typename Traits::LdsmT{}, mma_d);
  auto ld_d_bt = make_tiled_copy_B(typename Traits::LdsmT{}, mma_d);
  auto ld_sdp_a_thr = ld_sdp_a.get_thread_slice(tid);
  auto ld_sdp_b_thr = ld_sdp_b.get_thread_slice(tid);
  auto ld_d_a_thr = ld_d_a.get_thread_slice(tid);
  auto ld_d_at_thr = ld_d_at.get_thread_slice(tid);
  auto ld_d_bt_thr = ld_d_bt.get_thread_slice(tid);

  // S = Q K^T, dP = dO V^T
  Tensor rQ = thr_sdp.partition_fragment_A(sQ);
  Tensor rK = thr_sdp.partition_fragment_B(sK);
  Tensor rdO = thr_sdp.partition_fragment_A(sdO);
  Tensor rV = thr_sdp.partition_fragment_B(sV);
  Tensor tSsQ = ld_sdp_a_thr.partition_S(sQ);
  Tensor tSsK = ld_sdp_b_thr.partition_S(sK);
  Tensor tdPsdO = ld_sdp_a_thr.partition_S(sdO);
  Tensor tdPsV = ld_sdp_b_thr.partition_S(sV);
  // dV += P^T dO, dK += dS^T Q
  Tensor rPt = thr_d.partition_fragment_A(make_tensor(sP.data(), typename Traits::LayoutPdStPlain{}));
  Tensor rdOt = thr_d.partition_fragment_B(make_tensor(sdO.data(), typename Traits::LayoutQtPlain{}));
  Tensor rdSt = thr_d.partition_fragment_A(make_tensor(sdS.data(), typename Traits::LayoutPdStPlain{}));
  Tensor rQt = thr_d.partition_fragment_B(make_tensor(sQ.data(), typename Traits::LayoutQtPlain{}));
  Tensor tdVsPt = ld_d_at_thr.partition_S(sPt);
  Tensor tdVsdOt = ld_d_bt_thr.partition_S(sdOt);
  Tensor tdKsdSt = ld_d_at_thr.partition_S(sdSt);
  Tensor tdKsQt = ld_d_bt_thr.partition_S(sQt);
  // dQ = dS K
  Tensor rdS = thr_d.partition_fragment_A(sdS);
  Tensor rKt = thr_d.partition_fragment_B(make_tensor(sK.data(), typename Traits::LayoutKtPlain{}));
  Tensor tdQsdS = ld_d_a_thr.partition_S(sdS);
  Tensor tdQsKt = ld_d_bt_thr.partition_S(sKt);

  // Accumulator element -> (row, column) of its tile, for masks, lse rows and bounds.
  const Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kN>>{}));
  const Tensor tdKVc = thr_d.partition_C(make_identity_tensor(Shape<Int<kN>, Int<kD>>{}));
  const Tensor tdQc = thr_d.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kD>>{}));
  Tensor tPsP = thr_sdp.partition_C(sP);
  Tensor tPsdS = thr_sdp.partition_C(sdS);

  Tensor acc_dk = partition_fragment_C(mma_d, Shape<Int<kN>, Int<kD>>{});
  Tensor acc_dv = partition_fragment_C(mma_d, Shape<Int<kN>, Int<kD>>{});
  clear(acc_dk);
  clear(acc_dv);

  if (steps > 0) {
    const int64_t koff = (s.k_start + n0) * k_row + int64_t(item.head_kv) * d;
    const auto shape = Shape<Int<kN>, Int<kD>>{};
    const auto stride = make_stride(k_row, _1{});
    Tensor gK = make_tensor(make_gmem_ptr(static_cast<const Element*>(p.k) + koff), shape, stride);
    Tensor gV = make_tensor(make_gmem_ptr(static_cast<const Element*>(p.v) + koff), shape, stride);
    load_tile(gcopy, gthr.partition_S(gK), tKs, tKc, s.k_len - n0, d);
    load_tile(gcopy, gthr.partition_S(gV), tVs, tKc, s.k_len - n0, d);
    load_step(0);  // its fence also commits the K / V copies
  }

  for (int t = 0; t < steps; ++t) {
    const int h = step_head(t), m0 = step_m0(t);
    const ScoreMod mod(p, item.b, h);
    cp_async_wait<0>();
    __syncthreads();  // Q, dO (and K, V), lse, D in place; last step's dQ product done reading sdS

    Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kM>, Int<kN>>{});
    Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kM>, Int<kN>>{});
    clear(acc_s);
    clear(acc_dp);
    gemm_smem(acc_s, rQ, rK, tSsQ, tSsK, mma_sdp, ld_sdp_a, ld_sdp_b, ld_sdp_a_thr, ld_sdp_b_thr);
    gemm_smem(acc_dp, rdO, rV, tdPsdO, tdPsV, mma_sdp, ld_sdp_a, ld_sdp_b, ld_sdp_a_thr, ld_sdp_b_thr);

    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) {
      const int r = get<0>(tScS(i)), c = get<1>(tScS(i)), qi = m0 + r, kj = n0 + c;
      float grad = 0.f;  // through the softcap: dS with respect to scale q.k
      const float pr = s.visible(qi, kj, p)
                           ? exp_diff(mod(acc_s(i), int64_t(qi) + s.k_len - s.q_len - kj, &grad), s_lse[r])
                           : 0.f;
      tPsP(i) = static_cast<Element>(pr);
      tPsdS(i) = static_cast<Element>(pr * (acc_dp(i) - s_dsum[r]) * grad);
    }
    __syncthreads();  // P, dS in shared memory

    gemm_smem(acc_dv, rPt, rdOt, tdVsPt, tdVsdOt, mma_d, ld_d_at, ld_d_bt, ld_d_at_thr, ld_d_bt_thr);
    gemm_smem(acc_dk, rdSt, rQt, tdKsdSt, tdKsQt, mma_d, ld_d_at, ld_d_bt, ld_d_at_thr, ld_d_bt_thr);
    __syncthreads();  // Q, dO, lse, D no longer read: the next step may overwrite them
    if (t + 1 < steps) load_step(t + 1);

    Tensor acc_dq = partition_fragment_C(mma_d, Shape<Int<kM>, Int<kD>>{});
    clear(acc_dq);
    gemm_smem(acc_dq, rdS, rKt, tdQsdS, tdQsKt, mma_d, ld_d_a, ld_d_bt, ld_d_a_thr, ld_d_bt_thr);
    float* dq = p.dq_accum + (s.q_start + m0) * q_row + int64_t(h) * d;
    CUTE_UNROLL
    for (int i = 0; i < size(acc_dq); ++i) {
      const int r = get<0>(tdQc(i)), c = get<1>(tdQc(i));
      if (m0 + r < s.q_len && c < d) atomicAdd(dq + r * q_row + c, acc_dq(i));
    }
  }

  // dK = scale dS^T Q and dV (zero when no query sees these keys), rows past the document's keys skipped.
  const float scale = p.scale;
  const int64_t koff = (s.k_start + n0) * k_row + int64_t(item.head_kv) * d;
  Element* dk = static_cast<Element*>(p.dk) + koff;
  Element* dv = static_cast<Element*>(p.dv) + koff;
  CUTE_UNROLL
  for (int i = 0; i < size(acc_dk); ++i) {
    const int r = get<0>(tdKVc(i)), c = get<1>(tdKVc(i));
    if (n0 + r < s.k_len && c < d) {
      dk[r * k_row + c] = static_cast<Element>(acc_dk(i) * scale);
      dv[r * k_row + c] = static_cast<Element>(acc_dv(i));
    }
  }
}

// Each block strides over the key blocks of its (document, kv head): the grid has max_seqlen_k's key blocks
// per document, a longer document's remaining blocks go round again (see grid_key_blocks).
template <typename Traits>
__global__ void __launch_bounds__(Traits::kThreads, 1) backward_sm80_kernel(const BackwardParams p) {
  extern __shared__ __align__(128) char smem_raw[];
  const Item item = work_item(p, Traits::kBlockN);
  const SeqInfo s(p, item.b);
  // n_block + n_stride < 2^31: both are below ceil(2^31 / kBlockN); n_block * kBlockN < k_len fits an int.
  for (int n_block = item.first_n_block; int64_t(n_block) * Traits::kBlockN < s.k_len; n_block += item.n_stride) {
    backward_tile_sm80<Traits>(p, item, s, n_block * Traits::kBlockN, smem_raw);
    __syncthreads();  // the tile's last dQ product read sK and sdS: the next tile's loads overwrite them
  }
}

template <typename Traits>
cudaError_t launch_sm80(const BackwardParams& p, cudaStream_t stream) {
  const int64_t blocks = grid_key_blocks(p, Traits::kBlockN) * p.heads_kv * p.batch;
  if (blocks == 0) return cudaSuccess;
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  auto kernel = &backward_sm80_kernel<Traits>;
  constexpr int smem = Traits::kSmemBytes;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  kernel<<<dim3(unsigned(blocks)), Traits::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

// The instantiation for one head-dim bucket (defined per bucket in attention_backward_sm80_hdim*.cu).
template <int kHeadDim>
cudaError_t backward_sm80(const BackwardParams& p, cudaStream_t stream) {
  return p.dtype == DType::Float16 ? launch_sm80<Sm80Traits<kHeadDim, cutlass::half_t>>(p, stream)
                                   : launch_sm80<Sm80Traits<kHeadDim, cutlass::bfloat16_t>>(p, stream);
}

}  // namespace cm3leon::attention::bwd
