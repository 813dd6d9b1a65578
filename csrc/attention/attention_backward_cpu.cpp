// Attention backward on the CPU (FlashAttention-2 algorithm): probabilities are recomputed block by block
// from the saved log-sum-exp, never stored.
//
// Preprocessing packs Q (scaled, as row panels and as fp32 rows), dO (both forms) and computes
// D = rowsum(dO * O) per query row. A work item is (segment, kv head, block of BN keys): it keeps its dK/dV
// block in registers-and-L1 scratch while it sweeps the query heads of its GQA group and the query blocks
// that can see it (causal: the ones at or below the diagonal), so GQA gradients are summed in place.
// Per (query block, key block): S = Q K^T, dP = dO V^T, P = 2^(S - lse), dS = P (dP - D), then
// dV += P^T dO, dK += dS^T Q, dQ += dS K. dQ rows are shared between items, so each thread accumulates into
// its own fp32 dQ buffer and the buffers are summed at the end (no atomics).
#include <omp.h>

#include <algorithm>
#include <vector>

#include "attention/attention_cpu.h"
#include "attention/attention_tiles.h"
#include "common/parallel.h"

namespace cm3leon::attention {
namespace {

constexpr int64_t BM = 48;  // query rows per step (multiple of MR)
constexpr int64_t BN = 48;  // keys per work item (multiple of MR and of NR)

struct Item {
  int64_t segment, head_kv, n0, cost;
};

struct Scratch {
  std::vector<float> kt, vt, kr, dk, dv, s, dp, pt, dst, dsp;
};

// One row of probabilities and score gradients: p = 2^(s - lse2) where j < valid, else 0; ds = p (dp - D).
inline void softmax_grad_row(float* s, float* dp, int64_t valid, float lse2, float dsum) {
#if CM3LEON_ATTN_AVX2
  const __m256 lv = _mm256_set1_ps(lse2), dv = _mm256_set1_ps(dsum);
  const __m256 lane = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), lim = _mm256_set1_ps(float(valid));
  for (int64_t j = 0; j < BN; j += 8) {
    const __m256 keep = _mm256_cmp_ps(_mm256_add_ps(lane, _mm256_set1_ps(float(j))), lim, _CMP_LT_OQ);
    const __m256 p = _mm256_and_ps(exp2_neg(_mm256_sub_ps(_mm256_loadu_ps(s + j), lv)), keep);
    _mm256_storeu_ps(s + j, p);
    _mm256_storeu_ps(dp + j, _mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dp + j), dv)));
  }
#else
  for (int64_t j = 0; j < BN; ++j) {
    const float p = j < valid ? std::exp2(s[j] - lse2) : 0.f;
    s[j] = p;
    dp[j] = p * (dp[j] - dsum);
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
  std::vector<float> q_panels(qsize), q_rows(qsize), do_panels(qsize), do_rows(qsize);
  std::vector<float> lse2(size_t(hq * q_total)), dsum(size_t(hq * q_total));
  std::vector<Item> pre;
  for (int64_t s = 0; s < pr.num_segments; ++s)
    for (int64_t h = 0; h < hq; ++h)
      for (int64_t q0 = 0; q0 < pr.segments[s].q_len; q0 += BM) pre.push_back({s, h, q0, 0});
  parallel_items(int64_t(pre.size()), [&](int64_t i) {
    const Item& it = pre[size_t(i)];
    const Segment& sg = pr.segments[it.segment];
    const int64_t h = it.head_kv, q0 = it.n0, rows = std::min(BM, sg.q_len - q0), rows_pad = round_up(rows, MR);
    const int64_t src = ((sg.q_start + q0) * hq + h) * d, row = h * q_total + q_off[it.segment] + q0;
    pack_panels(q + src, hq * d, rows, d, qscale, MR, rows_pad, dp, q_panels.data() + row * dp);
    pack_rows(q + src, hq * d, rows, d, 1.f, rows_pad, dp, q_rows.data() + row * dp);
    pack_panels(dout + src, hq * d, rows, d, 1.f, MR, rows_pad, dp, do_panels.data() + row * dp);
    pack_rows(dout + src, hq * d, rows, d, 1.f, rows_pad, dp, do_rows.data() + row * dp);
    for (int64_t r = 0; r < rows; ++r) {
      const T* o = out + src + r * hq * d;
      float acc = 0.f;
      for (int64_t c = 0; c < d; ++c) acc += do_rows[size_t((row + r) * dp + c)] * to_float(o[c]);
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

  const int nt = num_threads();
  std::vector<float> dq_acc(size_t(nt) * qsize, 0.f);  // per-thread dQ / scale, fp32

#pragma omp parallel num_threads(nt)
  {
    float* my_dq = dq_acc.data() + size_t(omp_get_thread_num()) * qsize;
    Scratch sc;
    sc.kt.resize(size_t(dp * BN)); sc.vt.resize(size_t(dp * BN)); sc.kr.resize(size_t(BN * dp));
    sc.dk.resize(size_t(BN * dp)); sc.dv.resize(size_t(BN * dp));
    sc.s.resize(size_t(BM * BN)); sc.dp.resize(size_t(BM * BN));
    sc.pt.resize(size_t(BN * BM)); sc.dst.resize(size_t(BN * BM)); sc.dsp.resize(size_t(BM * BN));
#pragma omp for schedule(dynamic, 1)
    for (int64_t idx = 0; idx < int64_t(items.size()); ++idx) {
      const Item& it = items[size_t(idx)];
      const Segment& sg = pr.segments[it.segment];
      const int64_t hk = it.head_kv, n0 = it.n0, cols = std::min(BN, sg.k_len - n0);
      const int64_t ksrc = ((sg.k_start + n0) * hkv + hk) * d;
      pack_panels(k + ksrc, hkv * d, cols, d, 1.f, BN, BN, dp, sc.kt.data());
      pack_panels(v + ksrc, hkv * d, cols, d, 1.f, BN, BN, dp, sc.vt.data());
      pack_rows(k + ksrc, hkv * d, cols, d, 1.f, BN, dp, sc.kr.data());
      std::fill(sc.dk.begin(), sc.dk.end(), 0.f);
      std::fill(sc.dv.begin(), sc.dv.end(), 0.f);
      const int64_t first_q = pr.causal ? std::clamp<int64_t>(n0 - (sg.k_len - sg.q_len), 0, sg.q_len) : 0;

      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        for (int64_t q0 = first_q / MR * MR; q0 < sg.q_len; q0 += BM) {
          const int64_t rows = std::min(BM, sg.q_len - q0), rows_pad = round_up(rows, MR);
          const int64_t row = h * q_total + q_off[it.segment] + q0;
          float *s = sc.s.data(), *dpm = sc.dp.data();
          panel_gemm(q_panels.data() + row * dp, rows_pad, sc.kt.data(), BN, BN, dp, s, BN, false);
          panel_gemm(do_panels.data() + row * dp, rows_pad, sc.vt.data(), BN, BN, dp, dpm, BN, false);
          for (int64_t r = 0; r < rows_pad; ++r) {
            const int64_t valid =
                r < rows ? std::clamp<int64_t>(visible_keys(q0 + r, sg.q_len, sg.k_len, pr.causal) - n0, 0, cols)
                         : 0;
            const float l2 = r < rows ? lse2[size_t(row + r)] : 0.f, ds = r < rows ? dsum[size_t(row + r)] : 0.f;
            softmax_grad_row(s + r * BN, dpm + r * BN, valid, l2, ds);
            // P^T and dS^T as key panels (depth = query rows); dS as query panels (depth = keys).
            for (int64_t j = 0; j < BN; ++j) {
              const int64_t t = (j / MR) * rows_pad * MR + r * MR + j % MR;
              sc.pt[size_t(t)] = s[r * BN + j];
              sc.dst[size_t(t)] = dpm[r * BN + j];
              sc.dsp[size_t((r / MR) * BN * MR + j * MR + r % MR)] = dpm[r * BN + j];
            }
          }
          panel_gemm(sc.pt.data(), BN, do_rows.data() + row * dp, dp, dp, rows_pad, sc.dv.data(), dp, true);
          panel_gemm(sc.dst.data(), BN, q_rows.data() + row * dp, dp, dp, rows_pad, sc.dk.data(), dp, true);
          panel_gemm(sc.dsp.data(), rows_pad, sc.kr.data(), dp, dp, BN, my_dq + row * dp, dp, true);
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
  parallel_items(int64_t(pre.size()), [&](int64_t i) {
    const Item& it = pre[size_t(i)];
    const Segment& sg = pr.segments[it.segment];
    const int64_t h = it.head_kv, q0 = it.n0, rows = std::min(BM, sg.q_len - q0);
    const int64_t row = h * q_total + q_off[it.segment] + q0;
    for (int64_t r = 0; r < rows; ++r) {
      T* dst = dq + ((sg.q_start + q0 + r) * hq + h) * d;
      for (int64_t c = 0; c < d; ++c) {
        float acc = 0.f;
        for (int t = 0; t < nt; ++t) acc += dq_acc[size_t(t) * qsize + size_t((row + r) * dp + c)];
        from_float(acc * pr.scale, dst + c);
      }
    }
  });
}

}  // namespace

void backward_cpu(const Problem& p, const void* q, const void* k, const void* v, const void* out,
                  const float* lse, const void* dout, void* dq, void* dk, void* dv) {
  dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    backward(p, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
             static_cast<const T*>(out), lse, static_cast<const T*>(dout), static_cast<T*>(dq),
             static_cast<T*>(dk), static_cast<T*>(dv));
  });
}

}  // namespace cm3leon::attention
