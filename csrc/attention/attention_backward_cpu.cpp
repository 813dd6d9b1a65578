// Attention backward on the CPU (FlashAttention-2 algorithm): probabilities are recomputed block by block
// from the saved log-sum-exp, never stored.
//
// Preprocessing packs Q and dO in fp32 per block of BM queries, both transposed (B operands of S^T = K Q^T
// and dP^T = V dO^T) and as NR-column strips (B operands of dK and dV, see pack_strips), and computes
// D = rowsum(dO * O) per query row. A work item is (segment, kv head, block of BN keys): it keeps its dK/dV
// block in registers-and-L1 scratch while it sweeps the query heads of its GQA group and the query blocks
// that can see it (causal: the ones at or below the diagonal), so GQA gradients are summed in place.
// Per (query block, key block) everything is kept transposed ([keys][queries]), as in the forward:
// S^T = K Q^T, dP^T = V dO^T, P^T = 2^(S^T - lse), dS^T = P^T (dP^T - D) with vertical (per-query) vectors,
// then dV += P^T dO, dK += dS^T Q (six key rows per micro-kernel step) and dQ += dS K (six query columns
// of dS^T per step): no tile is ever transposed. dQ rows are shared between items, so each thread
// accumulates into its own fp32 dQ buffer and the buffers are summed at the end (no atomics).
#include <omp.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "attention/attention_cpu.h"
#include "attention/attention_tiles.h"
#include "common/parallel.h"
#include "common/scratch.h"

namespace cm3leon::attention {
CM3LEON_ISA_BEGIN
namespace {

// Measured on the 2-core AVX2 machine (one thread, S = 2048): 144 keys per item beat 48 by 8-11% at head
// dims 64-256, causal and not (the query-side panels streamed per step are reused by more keys); 96 and 192
// lost at head dims 256 and 32 respectively, and 96 query rows per step did not help.
constexpr int64_t BM = std::lcm(48, NR);  // query rows per step: 48 with AVX2, 96 with AVX-512
constexpr int64_t BN = 144;  // keys per work item (multiple of MR)
static_assert(BM % MR == 0 && BM % NR == 0 && BN % MR == 0, "blocks hold whole micro-kernel tiles");

struct Item {
  int64_t segment, head_kv, n0, cost;
};

struct Scratch {
  std::vector<float> kr, vr, dk, dv, s, dp, limit;
};

// P^T = 2^(S^T - lse2) and dS^T = P^T (dP^T - D) on [BN keys][BM queries] tiles, in place; key r of the
// block is visible to query c when r < limit[c] (limit <= valid keys of the block; 0 for padding queries).
inline void softmax_grad_block(float* s, float* dp, const float* lse2, const float* dsum,
                               const float* limit) {
#if CM3LEON_AVX2
  for (int64_t c = 0; c < BM; c += 8) {
    const __m256 lv = _mm256_loadu_ps(lse2 + c), dv = _mm256_loadu_ps(dsum + c);
    const __m256 lim = _mm256_loadu_ps(limit + c);
    for (int64_t r = 0; r < BN; ++r) {
      const __m256 keep = _mm256_cmp_ps(_mm256_set1_ps(float(r)), lim, _CMP_LT_OQ);
      const __m256 p = _mm256_and_ps(exp2_neg(_mm256_sub_ps(_mm256_loadu_ps(s + r * BM + c), lv)), keep);
      _mm256_storeu_ps(s + r * BM + c, p);
      const __m256 dpv = _mm256_loadu_ps(dp + r * BM + c);
      _mm256_storeu_ps(dp + r * BM + c, _mm256_mul_ps(p, _mm256_sub_ps(dpv, dv)));
    }
  }
#else
  for (int64_t r = 0; r < BN; ++r)
    for (int64_t c = 0; c < BM; ++c) {
      const float p = float(r) < limit[c] ? std::exp2(s[r * BM + c] - lse2[c]) : 0.f;
      s[r * BM + c] = p;
      dp[r * BM + c] = p * (dp[r * BM + c] - dsum[c]);
    }
#endif
}

template <typename T>
void backward(const Problem& pr, const T* q, const T* k, const T* v, const T* out, const float* lse,
              const T* dout, T* dq, T* dk, T* dv) {
  const int64_t d = pr.head_dim, dp = round_up(d, NR), hq = pr.heads_q, hkv = pr.heads_kv;
  const int64_t group = hq / hkv;
  const float qscale = pr.scale * kLog2e;

  // Query-side operands, packed once: row q0 of segment s, head h at (h * q_total + q_off[s] + q0) * dp.
  std::vector<int64_t> q_off(size_t(pr.num_segments) + 1, 0);
  for (int64_t s = 0; s < pr.num_segments; ++s) q_off[s + 1] = q_off[s] + round_up(pr.segments[s].q_len, BM);
  const int64_t q_total = q_off.back();
  const size_t qsize = size_t(hq * q_total * dp);
  const ScratchBuffer<float> q_t(qsize), q_rows(qsize), do_t(qsize), do_rows(qsize);
  const ScratchBuffer<float> lse2(size_t(hq * q_total)), dsum(size_t(hq * q_total));
  std::vector<Item> pre;
  for (int64_t s = 0; s < pr.num_segments; ++s)
    for (int64_t h = 0; h < hq; ++h)
      for (int64_t q0 = 0; q0 < pr.segments[s].q_len; q0 += BM) pre.push_back({s, h, q0, 0});
  parallel_items(pr.threads, int64_t(pre.size()), [&](int64_t i) {
    const Item& it = pre[size_t(i)];
    const Segment& sg = pr.segments[it.segment];
    const int64_t h = it.head_kv, q0 = it.n0, rows = std::min(BM, sg.q_len - q0);
    const int64_t src = ((sg.q_start + q0) * hq + h) * d, row = h * q_total + q_off[it.segment] + q0;
    pack_panels(q + src, hq * d, rows, d, qscale, BM, BM, dp, q_t.data() + row * dp);  // [dp][BM]
    pack_strips(q + src, hq * d, rows, d, BM, BM, dp, q_rows.data() + row * dp);
    pack_panels(dout + src, hq * d, rows, d, 1.f, BM, BM, dp, do_t.data() + row * dp);
    pack_strips(dout + src, hq * d, rows, d, BM, BM, dp, do_rows.data() + row * dp);
    for (int64_t r = 0; r < BM; ++r) {
      if (r >= rows) {  // padding queries: finite values, masked out by their limit
        dsum[size_t(row + r)] = 0.f;
        lse2[size_t(row + r)] = 0.f;
        continue;
      }
      const T *o = out + src + r * hq * d, *g = dout + src + r * hq * d;
      float acc = 0.f;
      for (int64_t c = 0; c < d; ++c) acc += to_float(g[c]) * to_float(o[c]);
      dsum[size_t(row + r)] = acc;
      const float l = lse[sg.lse_start + h * pr.lse_head_stride + q0 + r];
      // A row that saw no key (lse = -inf) has every probability masked; +inf keeps 2^(s - lse) at 0.
      lse2[size_t(row + r)] = l == kNegInf ? -kNegInf : l * kLog2e;
    }
  });

  std::vector<Item> items;
  for (int64_t s = 0; s < pr.num_segments; ++s) {
    const Segment& sg = pr.segments[s];
    for (int64_t n0 = 0; n0 < sg.k_len; n0 += BN) {
      const int64_t first_q = pr.causal ? std::clamp<int64_t>(n0 - (sg.k_len - sg.q_len), 0, sg.q_len) : 0;
      for (int64_t h = 0; h < hkv; ++h) items.push_back({s, h, n0, (sg.q_len - first_q + BM) * group});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });

  const int nt = usable_threads(pr.threads);
  // Per-thread dQ / scale in fp32, laid out like q_rows (NR-column strips per query block) so that every
  // micro-kernel tile of dQ is contiguous.
  const ScratchBuffer<float> dq_acc(size_t(nt) * qsize);

#pragma omp parallel num_threads(nt)
  {
    // Zeroed by the team (each buffer's pages then start on its thread), all nt even if the team is smaller.
#pragma omp for schedule(static)
    for (int t = 0; t < nt; ++t) std::fill_n(dq_acc.data() + size_t(t) * qsize, qsize, 0.f);
    float* my_dq = dq_acc.data() + size_t(omp_get_thread_num()) * qsize;
    Scratch sc;
    sc.kr.resize(size_t(BN * dp)); sc.vr.resize(size_t(BN * dp));
    sc.dk.resize(size_t(BN * dp)); sc.dv.resize(size_t(BN * dp));
    sc.s.resize(size_t(BN * BM)); sc.dp.resize(size_t(BN * BM)); sc.limit.resize(size_t(BM));
#pragma omp for schedule(dynamic, 1)
    for (int64_t idx = 0; idx < int64_t(items.size()); ++idx) {
      const Item& it = items[size_t(idx)];
      const Segment& sg = pr.segments[it.segment];
      const int64_t hk = it.head_kv, n0 = it.n0, cols = std::min(BN, sg.k_len - n0);
      const int64_t ksrc = ((sg.k_start + n0) * hkv + hk) * d;
      pack_rows(k + ksrc, hkv * d, cols, d, 1.f, BN, dp, sc.kr.data());
      pack_rows(v + ksrc, hkv * d, cols, d, 1.f, BN, dp, sc.vr.data());
      std::fill(sc.dk.begin(), sc.dk.end(), 0.f);
      std::fill(sc.dv.begin(), sc.dv.end(), 0.f);
      const int64_t first_q = pr.causal ? std::clamp<int64_t>(n0 - (sg.k_len - sg.q_len), 0, sg.q_len) : 0;
      float *s = sc.s.data(), *dpt = sc.dp.data(), *kr = sc.kr.data(), *vr = sc.vr.data();

      for (int64_t q0 = first_q / BM * BM; q0 < sg.q_len; q0 += BM) {
        const int64_t rows = std::min(BM, sg.q_len - q0), rows16 = round_up(rows, NR);
        const int64_t rows6 = round_up(rows, MR);
        for (int64_t c = 0; c < BM; ++c) {
          const int64_t seen = c < rows ? visible_keys(q0 + c, sg.q_len, sg.k_len, pr.causal) - n0 : 0;
          sc.limit[size_t(c)] = float(std::clamp<int64_t>(seen, 0, cols));
        }
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          const int64_t row = h * q_total + q_off[it.segment] + q0;
          const float *qt = q_t.data() + row * dp, *dot = do_t.data() + row * dp;
          for (int64_t r0 = 0; r0 < BN; r0 += MR)  // S^T = K Q^T, dP^T = V dO^T
            for (int64_t c = 0; c < rows16; c += NR) {
              micro_tile(kr + r0 * dp, 1, dp, qt + c, BM, dp, s + r0 * BM + c, BM, false);
              micro_tile(vr + r0 * dp, 1, dp, dot + c, BM, dp, dpt + r0 * BM + c, BM, false);
            }
          softmax_grad_block(s, dpt, lse2.data() + row, dsum.data() + row, sc.limit.data());
          for (int64_t r0 = 0; r0 < BN; r0 += MR)  // dV += P^T dO, dK += dS^T Q
            for (int64_t c = 0; c < dp; c += NR) {
              micro_tile(s + r0 * BM, 1, BM, do_rows.data() + row * dp + c * BM, NR, rows,
                         sc.dv.data() + r0 * dp + c, dp, true);
              micro_tile(dpt + r0 * BM, 1, BM, q_rows.data() + row * dp + c * BM, NR, rows,
                         sc.dk.data() + r0 * dp + c, dp, true);
            }
          for (int64_t c = 0; c < dp; c += NR)  // dQ += dS K (six query columns of dS^T per step)
            for (int64_t qr = 0; qr < rows6; qr += MR)
              micro_tile(dpt + qr, BM, 1, kr + c, dp, BN, my_dq + row * dp + c * BM + qr * NR, NR, true);
        }
      }
      for (int64_t j = 0; j < cols; ++j) {
        const int64_t dst = ((sg.k_start + n0 + j) * hkv + hk) * d;
        for (int64_t c = 0; c < d; ++c) {
          from_float(sc.dk[size_t(j * dp + c)] * pr.scale, dk + dst + c);
          from_float(sc.dv[size_t(j * dp + c)], dv + dst + c);
        }
      }
    }
  }

  // dQ = scale * (sum of the per-thread buffers), written in q's layout and dtype.
  parallel_items(pr.threads, int64_t(pre.size()), [&](int64_t i) {
    const Item& it = pre[size_t(i)];
    const Segment& sg = pr.segments[it.segment];
    const int64_t h = it.head_kv, q0 = it.n0, rows = std::min(BM, sg.q_len - q0);
    const int64_t row = h * q_total + q_off[it.segment] + q0;
    for (int64_t r = 0; r < rows; ++r) {
      T* dst = dq + ((sg.q_start + q0 + r) * hq + h) * d;
      for (int64_t c = 0; c < d; ++c) {
        float acc = 0.f;
        const size_t at = size_t(row * dp + (c / NR) * BM * NR + r * NR + c % NR);
        for (int t = 0; t < nt; ++t) acc += dq_acc[size_t(t) * qsize + at];
        from_float(acc * pr.scale, dst + c);
      }
    }
  });
}

}  // namespace

void backward_all(const Problem& p, const void* q, const void* k, const void* v, const void* out,
                  const float* lse, const void* dout, void* dq, void* dk, void* dv) {
  dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    backward(p, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
             static_cast<const T*>(out), lse, static_cast<const T*>(dout), static_cast<T*>(dq),
             static_cast<T*>(dk), static_cast<T*>(dv));
  });
}

CM3LEON_ISA_END

template <>
void backward_kernel<kIsa>(const Problem& p, const void* q, const void* k, const void* v, const void* out,
                           const float* lse, const void* dout, void* dq, void* dk, void* dv) {
  backward_all(p, q, k, v, out, lse, dout, dq, dk, dv);
}

}  // namespace cm3leon::attention
