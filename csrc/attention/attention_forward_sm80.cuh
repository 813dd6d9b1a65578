// FlashAttention-2-style forward on tensor cores (sm80 mma.sync; also runs on sm90). Torch-free.
//
// One block owns kBlockM query rows of one (batch row / document, q head) and walks the key blocks from the
// last visible one down to 0: S = Q K^T (fp32 accumulators), mask the blocks that cross the sequence end or
// the causal diagonal, online softmax in registers (exp_diff), O += P V with P converted to the
// input type. K of the next step streams in (cp.async) while the current step's softmax and P V run; V
// streams in while S = Q K^T runs. Smem: Q, one K and one V tile; O is staged through Q's smem for
// 16-byte stores. GQA: q head h reads kv head h / (heads_q / heads_kv).
#pragma once
#include "attention/attention_cuda_traits.cuh"
#include "attention/attention_forward_sm80.h"

namespace cm3leon::attention::cuda {

// acc += A B^T for one (M, N) tile: A and B are loaded k-slice by k-slice from smem (ldmatrix), the next
// slice's load overlapping the current slice's mma.
template <typename TiledMma, typename Acc, typename RA, typename RB, typename SA, typename SB, typename CopyA,
          typename CopyB, typename ThrCopyA, typename ThrCopyB>
__device__ __forceinline__ void gemm_smem_smem(const TiledMma& mma, Acc& acc, RA& rA, RB& rB, const SA& sA,
                                               const SB& sB, const CopyA& copy_a, const CopyB& copy_b,
                                               const ThrCopyA& thr_a, const ThrCopyB& thr_b) {
  using namespace cute;
  auto rA_view = thr_a.retile_D(rA);
  auto rB_view = thr_b.retile_D(rB);
  cute::copy(copy_a, sA(_, _, 0), rA_view(_, _, 0));
  cute::copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
  CUTE_UNROLL
  for (int i = 0; i < size<2>(rA); ++i) {
    if (i + 1 < size<2>(rA)) {
      cute::copy(copy_a, sA(_, _, i + 1), rA_view(_, _, i + 1));
      cute::copy(copy_b, sB(_, _, i + 1), rB_view(_, _, i + 1));
    }
    cute::gemm(mma, rA(_, _, i), rB(_, _, i), acc);
  }
}

// acc += A B^T with A already in registers (P) and B loaded slice by slice from smem (V^T).
template <typename TiledMma, typename Acc, typename RA, typename RB, typename SB, typename CopyB,
          typename ThrCopyB>
__device__ __forceinline__ void gemm_reg_smem(const TiledMma& mma, Acc& acc, const RA& rA, RB& rB, const SB& sB,
                                              const CopyB& copy_b, const ThrCopyB& thr_b) {
  using namespace cute;
  auto rB_view = thr_b.retile_D(rB);
  cute::copy(copy_b, sB(_, _, 0), rB_view(_, _, 0));
  CUTE_UNROLL
  for (int i = 0; i < size<2>(rA); ++i) {
    if (i + 1 < size<2>(rA)) cute::copy(copy_b, sB(_, _, i + 1), rB_view(_, _, i + 1));
    cute::gemm(mma, rA(_, _, i), rB(_, _, i), acc);
  }
}

template <typename Traits>
__device__ void forward_tile(const AttnParams& p, const SeqInfo& s, int64_t b, int h, int m_block, char* smem) {
  using namespace cute;
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM, kBlockN = Traits::kBlockN, kHeadDim = Traits::kHeadDim;
  constexpr int kNWarps = Traits::kNWarps;
  const int tidx = threadIdx.x, lane = tidx % 32, warp = tidx / 32;
  const int d = p.head_dim;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int rows_left = s.q_len - m_block * kBlockM;  // > 0

  // Key blocks this tile needs: from the first key its first row sees to the last one its last row sees.
  const int first_row = m_block * kBlockM, last_row = first_row + min(rows_left, kBlockM) - 1;
  const int n_block_min = s.key_lo(first_row, p) / kBlockN;
  const int n_block_max = (s.key_hi(last_row, p) + kBlockN - 1) / kBlockN;
  const ScoreMod mod(p, b, h);

  // Gmem views of this tile: token rows of one head; the head dim is padded to kHeadDim (predicated).
  const Element* q_ptr = static_cast<const Element*>(p.q) + (s.q_start + int64_t(m_block) * kBlockM) * p.q_row_stride +
                         int64_t(h) * d;
  Element* o_ptr = static_cast<Element*>(p.out) + (s.q_start + int64_t(m_block) * kBlockM) * p.q_row_stride +
                   int64_t(h) * d;
  const int64_t kv_offset = s.k_start * p.k_row_stride + int64_t(hk) * d;
  const auto tile_layout = make_layout(Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_stride(p.q_row_stride, _1{}));
  Tensor gQ = make_tensor(make_gmem_ptr(q_ptr), tile_layout);
  Tensor gO = make_tensor(make_gmem_ptr(o_ptr), tile_layout);
  const int n_blocks_total = max(n_block_max, 1);
  const auto kv_layout = make_layout(make_shape(Int<kBlockN>{}, Int<kHeadDim>{}, n_blocks_total),
                                     make_stride(p.k_row_stride, _1{}, p.k_row_stride * kBlockN));
  Tensor gK = make_tensor(make_gmem_ptr(static_cast<const Element*>(p.k) + kv_offset), kv_layout);
  Tensor gV = make_tensor(make_gmem_ptr(static_cast<const Element*>(p.v) + kv_offset), kv_layout);

  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(smem)), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(sK.data() + size(sK), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(sV.data(), typename Traits::SmemLayoutVt{});
  Tensor sVtNoSwizzle = make_tensor(sV.data().get(), typename Traits::SmemLayoutVtNoSwizzle{});

  typename Traits::GmemTiledCopyQKV gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tidx);
  Tensor tQgQ = gmem_thr.partition_S(gQ);
  Tensor tQsQ = gmem_thr.partition_D(sQ);
  Tensor tKgK = gmem_thr.partition_S(gK);  // (CPY, CPY_N, CPY_K, n_blocks)
  Tensor tKsK = gmem_thr.partition_D(sK);
  Tensor tVgV = gmem_thr.partition_S(gV);
  Tensor tVsV = gmem_thr.partition_D(sV);
  Tensor tQcQ = gmem_thr.partition_S(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tKVcKV = gmem_thr.partition_S(make_identity_tensor(Shape<Int<kBlockN>, Int<kHeadDim>>{}));

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tidx);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(sK);
  Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);
  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});

  auto smem_copy_q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_q = smem_copy_q.get_thread_slice(tidx);
  Tensor tSsQ = smem_thr_q.partition_S(sQ);
  auto smem_copy_k = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_k = smem_copy_k.get_thread_slice(tidx);
  Tensor tSsK = smem_thr_k.partition_S(sK);
  auto smem_copy_v = make_tiled_copy_B(typename Traits::SmemCopyAtomTransposed{}, tiled_mma);
  auto smem_thr_v = smem_copy_v.get_thread_slice(tidx);
  Tensor tOsVt = smem_thr_v.partition_S(sVt);

  // Accumulator coordinates: this thread's rows are row0 + 8 i + 16 kNWarps mi, its columns
  // col0 + j + 8 nj (the m16n8 C fragment layout).
  const int row0 = warp * 16 + lane / 4, col0 = (lane % 4) * 2;
  Tensor acc_o_rc = make_tensor(acc_o.data(), acc_rowcol_layout(acc_o.layout()));
  constexpr int kRows = decltype(size<0>(acc_o_rc))::value;
  auto tile_row = [&](int r) { return row0 + (r % 2) * 8 + (r / 2) * 16 * kNWarps; };

  clear(acc_o);
  float row_max[kRows], row_sum[kRows];
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    row_max[r] = -INFINITY;
    row_sum[r] = 0.f;
  }

  if (n_block_max > n_block_min) {
    copy_rows_predicated(gmem_copy, tQgQ, tQsQ, tQcQ, rows_left, d);
    int n_block = n_block_max - 1;
    copy_rows_predicated(gmem_copy, tKgK(_, _, _, n_block), tKsK, tKVcKV, s.k_len - n_block * kBlockN, d);
    cute::cp_async_fence();

    for (; n_block >= n_block_min; --n_block) {
      Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
      clear(acc_s);
      cute::cp_async_wait<0>();
      __syncthreads();  // K[n_block] (and Q) landed; every warp finished reading V[n_block + 1]
      copy_rows_predicated(gmem_copy, tVgV(_, _, _, n_block), tVsV, tKVcKV, s.k_len - n_block * kBlockN, d);
      cute::cp_async_fence();

      gemm_smem_smem(tiled_mma, acc_s, tSrQ, tSrK, tSsQ, tSsK, smem_copy_q, smem_copy_k, smem_thr_q, smem_thr_k);

      // Scores through ScoreMod (scale, softcap, ALiBi); mask keys outside each row's window or past the end.
      Tensor s_rc = make_tensor(acc_s.data(), acc_rowcol_layout(acc_s.layout()));
      const int key0 = n_block * kBlockN;
      const bool need_mask = key0 + kBlockN > s.key_hi(first_row, p) || key0 < s.key_lo(last_row, p);
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        const int row = first_row + tile_row(r);
        const int lo = need_mask ? s.key_lo(row, p) : 0, hi = need_mask ? s.key_hi(row, p) : s.k_len;
        const int64_t diag = int64_t(row) + s.k_len - s.q_len;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(s_rc); ++c) {
          const int key = key0 + col0 + (c % 2) + (c / 2) * 8;
          s_rc(r, c) = (need_mask && (key < lo || key >= hi)) ? -INFINITY : mod(s_rc(r, c), diag - key);
        }
      }

      cute::cp_async_wait<0>();
      __syncthreads();  // V[n_block] landed; every warp finished reading K[n_block]
      if (n_block > n_block_min) {
        copy_rows_predicated(gmem_copy, tKgK(_, _, _, n_block - 1), tKsK, tKVcKV,
                             s.k_len - (n_block - 1) * kBlockN, d);
        cute::cp_async_fence();
      }

      // Online softmax: new running max, rescale the running sum and O, exponentiate the scores.
      CUTE_UNROLL
      for (int r = 0; r < kRows; ++r) {
        float m = row_max[r];
        CUTE_UNROLL
        for (int c = 0; c < size<1>(s_rc); ++c) m = fmaxf(m, s_rc(r, c));
        m = quad_max(m);
        const float m_use = m == -INFINITY ? 0.f : m;  // a row with nothing visible yet stays at zero
        const float rescale = exp_diff(row_max[r], m_use);
        row_max[r] = m;
        float sum = 0.f;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(s_rc); ++c) {
          s_rc(r, c) = exp_diff(s_rc(r, c), m_use);
          sum += s_rc(r, c);
        }
        row_sum[r] = row_sum[r] * rescale + sum;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(acc_o_rc); ++c) acc_o_rc(r, c) *= rescale;
      }

      Tensor rP = make_tensor<Element>(acc_s.layout());
      convert_fragment(acc_s, rP);
      Tensor tOrP = make_tensor(rP.data(), acc_as_a_layout(rP.layout()));
      gemm_reg_smem(tiled_mma, acc_o, tOrP, tOrVt, tOsVt, smem_copy_v, smem_thr_v);
    }
  }

  // Epilogue: O /= row sum, lse = ln(sum) + max; rows that saw no key (sum == 0) give O = 0 and lse = -inf,
  // a NaN sum (NaN or inf inputs) gives NaN rows as in PyTorch.
  float* lse_ptr = p.lse + s.lse_start + int64_t(h) * p.lse_head_stride + int64_t(m_block) * kBlockM;
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const float sum = quad_sum(row_sum[r]);
    const float inv = sum == 0.f ? 0.f : 1.f / sum;
    CUTE_UNROLL
    for (int c = 0; c < size<1>(acc_o_rc); ++c) acc_o_rc(r, c) *= inv;
    const int row = tile_row(r);
    if (lane % 4 == 0 && row < rows_left) lse_ptr[row] = sum == 0.f ? -INFINITY : row_max[r] + logf(sum);
  }

  Tensor rO = make_tensor<Element>(acc_o.layout());
  convert_fragment(acc_o, rO);
  Tensor sO = make_tensor(sQ.data(), typename Traits::SmemLayoutQ{});
  auto smem_copy_o = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, tiled_mma);
  auto smem_thr_o = smem_copy_o.get_thread_slice(tidx);
  __syncthreads();  // every warp finished reading sQ (a tile without keys never loaded it)
  cute::copy(smem_copy_o, smem_thr_o.retile_S(rO), smem_thr_o.partition_D(sO));
  __syncthreads();

  typename Traits::GmemTiledCopyO gmem_copy_o;
  auto gmem_thr_o = gmem_copy_o.get_thread_slice(tidx);
  Tensor tOsO = gmem_thr_o.partition_S(sO);
  Tensor tOgO = gmem_thr_o.partition_D(gO);
  Tensor tOrO = make_tensor<Element>(shape(tOgO));
  cute::copy(gmem_copy_o, tOsO, tOrO);
  Tensor tOcO = gmem_thr_o.partition_D(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  store_rows_predicated(gmem_copy_o, tOrO, tOgO, tOcO, rows_left, d);
}

// Grid: (m blocks, batch, heads_q). Blocks take m blocks in reverse so the longest causal tiles start first;
// a document longer than the grid's max_seqlen is still covered by striding over m blocks.
template <typename Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1) forward_sm80_kernel(const AttnParams p) {
  extern __shared__ __align__(128) char smem[];
  const SeqInfo s(p, blockIdx.y);
  const int num_m_blocks = (s.q_len + Traits::kBlockM - 1) / Traits::kBlockM;
  for (int m_block = int(gridDim.x) - 1 - int(blockIdx.x); m_block < num_m_blocks; m_block += gridDim.x) {
    forward_tile<Traits>(p, s, blockIdx.y, blockIdx.z, m_block, smem);
    __syncthreads();  // smem is reused by the next tile
  }
}

// The tile configuration of each head-dim instantiation: 8 warps x 16 query rows; 64-key blocks, 32 for head
// dim 256 (keeps the fp32 O accumulators + scores within 255 registers without spills).
template <int kHeadDim, typename Element>
using ForwardSm80Traits = Sm80Traits<kHeadDim, 128, (kHeadDim <= 128 ? 64 : 32), 8, Element>;

template <typename Traits>
cudaError_t launch_forward_sm80(const AttnParams& p, cudaStream_t stream) {
  constexpr int smem = Traits::kSmemBytes;
  auto kernel = forward_sm80_kernel<Traits>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  const int m_blocks = (p.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  if (m_blocks == 0 || p.batch == 0 || p.heads_q == 0) return cudaSuccess;
  kernel<<<dim3(unsigned(m_blocks), unsigned(p.batch), unsigned(p.heads_q)), Traits::kNThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename Element, int kHeadDim>
cudaError_t run_forward_sm80(const AttnParams& p, cudaStream_t stream) {
  return launch_forward_sm80<ForwardSm80Traits<kHeadDim, Element>>(p, stream);
}

}  // namespace cm3leon::attention::cuda
