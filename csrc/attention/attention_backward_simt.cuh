// Attention backward for float32 inputs with plain fp32 FMAs: the slow, simple path (tensor cores would need
// TF32 and lose the precision fp32 users ask for).
//
// Same decomposition as the tensor-core kernel, on 16 x 16 tiles: a block owns 16 keys of one kv head at a
// time (K, V in shared memory, dK and dV in registers; striding on over a document longer than max_seqlen_k)
// and sweeps the (query head of the GQA group, 16-query block) steps that can see them. 256 threads: for S
// and dP one thread per (key, query) pair, for dK / dV one per (key, column mod 16), for dQ one per (query,
// column mod 16). Shared rows are padded by one float so column reads of 16 rows fall in 16 different banks.
#pragma once
#include "attention/attention_backward_common.cuh"

namespace cm3leon::attention::bwd {

constexpr int kSimtBlock = 16;                  // keys per block and queries per step
constexpr int kSimtThreads = kSimtBlock * 16;   // 16 threads per key / query row
constexpr int kSimtCols = 256 / 16;             // head-dim columns per thread (head_dim <= 256)

inline size_t simt_smem_bytes(int64_t head_dim) {
  const size_t tile = size_t(kSimtBlock) * size_t(head_dim + 1);
  return sizeof(float) * (4 * tile + 2 * kSimtBlock * (kSimtBlock + 1) + 2 * kSimtBlock);
}

// Copies rows [0, 16) of a [rows, d] tile (token stride `stride`) into padded shared rows, zeros past `rows`.
__device__ inline void load_rows_f32(const float* src, int64_t stride, int rows, int d, float* dst) {
  for (int i = threadIdx.x; i < kSimtBlock * d; i += kSimtThreads) {
    const int r = i / d, c = i % d;
    dst[r * (d + 1) + c] = r < rows ? src[r * stride + c] : 0.f;
  }
}

// dK, dV of keys [n0, n0 + 16) (n0 < s.k_len) of kv head item.head_kv, and their dQ contributions.
__device__ inline void backward_tile_simt(const BackwardParams& p, const Item& item, const SeqInfo& s, int n0,
                                          float* smem_f32) {
  constexpr int B = kSimtBlock, LP = B + 1;  // P / dS rows are padded too
  const int d = int(p.head_dim), ld = d + 1, group = int(p.heads_q / p.heads_kv);
  const int64_t q_row = p.heads_q * p.head_dim, k_row = p.heads_kv * p.head_dim;
  float *sK = smem_f32, *sV = sK + B * ld, *sQ = sV + B * ld, *sdO = sQ + B * ld;
  float *sP = sdO + B * ld, *sdS = sP + B * LP, *s_lse = sdS + B * LP, *s_dsum = s_lse + B;

  const int tid = opaque(int(threadIdx.x));
  const int row = tid / 16, lane = tid % 16;  // row: key (or query for dQ); lane: column
  const int64_t koff = (s.k_start + n0) * k_row + int64_t(item.head_kv) * d;
  load_rows_f32(static_cast<const float*>(p.k) + koff, k_row, s.k_len - n0, d, sK);
  load_rows_f32(static_cast<const float*>(p.v) + koff, k_row, s.k_len - n0, d, sV);
  float dk[kSimtCols] = {}, dv[kSimtCols] = {};

  const int m_begin = s.first_query(n0, p) / B;
  const int m_count = max(0, (s.end_query(n0 + B, p) + B - 1) / B - m_begin);
  for (int t = 0; t < m_count * group; ++t) {
    const int h = item.head_kv * group + t / m_count, m0 = (m_begin + t % m_count) * B;
    __syncthreads();  // the previous step is done with sQ, sdO, sP, sdS, lse, D
    const int64_t qoff = (s.q_start + m0) * q_row + int64_t(h) * d;
    load_rows_f32(static_cast<const float*>(p.q) + qoff, q_row, s.q_len - m0, d, sQ);
    load_rows_f32(static_cast<const float*>(p.dout) + qoff, q_row, s.q_len - m0, d, sdO);
    if (tid < B) {
      const int qi = m0 + tid;
      s_lse[tid] = qi < s.q_len ? lse_for_p(p, s, h, qi) : INFINITY;
      s_dsum[tid] = qi < s.q_len ? dsum_at(p, s, h, qi) : 0.f;
    }
    __syncthreads();

    {  // P^T and dS^T entry (key `row`, query `lane`)
      float sc = 0.f, dp = 0.f;
      const float *kr = sK + row * ld, *qr = sQ + lane * ld;
      for (int c = 0; c < d; c += 4)  // grouped as the forward's float4 dot product: the same score, bit for bit
        sc += kr[c] * qr[c] + kr[c + 1] * qr[c + 1] + kr[c + 2] * qr[c + 2] + kr[c + 3] * qr[c + 3];
      for (int c = 0; c < d; ++c) dp += sV[row * ld + c] * sdO[lane * ld + c];
      const int qi = m0 + lane, kj = n0 + row;
      float grad = 0.f;  // through the softcap: dS with respect to scale q.k
      const float pr = s.visible(qi, kj, p)
                           ? exp_diff(ScoreMod(p, item.b, h)(sc, int64_t(qi) + s.k_len - s.q_len - kj, &grad),
                                      s_lse[lane])
                           : 0.f;
      sP[row * LP + lane] = pr;
      sdS[row * LP + lane] = pr * (dp - s_dsum[lane]) * grad;
    }
    __syncthreads();

#pragma unroll
    for (int j = 0; j < kSimtCols; ++j) {
      const int c = lane + 16 * j;
      if (c >= d) break;
      float pv = 0.f, pk = 0.f, pq = 0.f;
      for (int i = 0; i < B; ++i) {
        pv += sP[row * LP + i] * sdO[i * ld + c];   // dV[key row] += P^T dO
        pk += sdS[row * LP + i] * sQ[i * ld + c];   // dK[key row] += dS^T Q
        pq += sdS[i * LP + row] * sK[i * ld + c];   // dQ[query row] = dS K
      }
      dv[j] += pv;
      dk[j] += pk;
      if (m0 + row < s.q_len) atomicAdd(p.dq_accum + qoff + int64_t(row) * q_row + c, pq);
    }
  }

  if (n0 + row < s.k_len) {
    const float scale = p.scale;
    float* dk_row = static_cast<float*>(p.dk) + koff + int64_t(row) * k_row;
    float* dv_row = static_cast<float*>(p.dv) + koff + int64_t(row) * k_row;
#pragma unroll
    for (int j = 0; j < kSimtCols; ++j) {
      const int c = lane + 16 * j;
      if (c >= d) break;
      dk_row[c] = dk[j] * scale;
      dv_row[c] = dv[j];
    }
  }
}

// Each block strides over the key blocks of its (document, kv head), as the tensor-core kernel.
__global__ void __launch_bounds__(kSimtThreads) backward_simt_kernel(const BackwardParams p) {
  extern __shared__ float smem_f32[];
  const Item item = work_item(p, kSimtBlock);
  const SeqInfo s(p, item.b);
  // n_block + n_stride < 2^31: both are below ceil(2^31 / 16); n_block * 16 < k_len fits an int.
  for (int n_block = item.first_n_block; int64_t(n_block) * kSimtBlock < s.k_len; n_block += item.n_stride) {
    backward_tile_simt(p, item, s, n_block * kSimtBlock, smem_f32);
    __syncthreads();  // the tile's last step read sK, sQ, sdO, sP, sdS: the next tile's loads overwrite them
  }
}

}  // namespace cm3leon::attention::bwd
