// Tiled online-softmax attention forward (FlashAttention-2 style) on the CPU.
//
// K is packed once per call into fp32 K^T blocks ([head_dim][BN] per BN keys) and V into fp32 rows, so
// bf16/fp16 are widened once and every work item streams ready micro-kernel operands. A work item is
// (segment, query head, block of BM queries): S = Q K^T block by block with the 6x16 micro-kernel, running
// max/sum per row, P packed into row panels, O += P V with the same micro-kernel. The S x S matrix never
// exists; scratch per item is O(BM * (BN + head_dim)). Items are sorted by cost (causal blocks near the
// diagonal are cheap) and scheduled dynamically so both cores finish together.
#include "attention/attention_cpu.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "attention/attention_decode.h"
#include "attention/attention_tiles.h"
#include "common/parallel.h"

namespace cm3leon::attention {
namespace {

constexpr int64_t BM = 48;  // query rows per work item (multiple of MR)
constexpr int64_t BN = 64;  // keys per block (multiple of NR)

struct Item {
  int64_t segment, head, q0, cost;
};

// Per-thread scratch, reused across items and calls.
struct Scratch {
  std::vector<float> q, s, p, o, m, l;
};

template <typename T>
void forward_tiled(const Problem& pr, const T* q, const T* k, const T* v, T* out, float* lse) {
  const int64_t d = pr.head_dim, dp = round_up(d, NR), hq = pr.heads_q, hkv = pr.heads_kv;
  const int64_t group = hq / hkv;

  // Pack K^T and V (fp32) once: block n0 of segment s, kv head h starts at (h * k_total + k_off[s] + n0) * dp.
  std::vector<int64_t> k_off(size_t(pr.num_segments) + 1, 0);
  for (int64_t s = 0; s < pr.num_segments; ++s) k_off[s + 1] = k_off[s] + round_up(pr.segments[s].k_len, BN);
  const int64_t k_total = k_off.back();
  std::vector<float> kt(size_t(hkv * k_total * dp)), vr(size_t(hkv * k_total * dp));
  std::vector<Item> pack_items;
  for (int64_t s = 0; s < pr.num_segments; ++s)
    for (int64_t h = 0; h < hkv; ++h)
      for (int64_t n0 = 0; n0 < pr.segments[s].k_len; n0 += BN) pack_items.push_back({s, h, n0, 0});
  parallel_items(int64_t(pack_items.size()), [&](int64_t i) {
    const Item& it = pack_items[size_t(i)];
    const Segment& sg = pr.segments[it.segment];
    const int64_t cols = std::min(BN, sg.k_len - it.q0);
    const int64_t src = ((sg.k_start + it.q0) * hkv + it.head) * d;
    const int64_t dst = (it.head * k_total + k_off[it.segment] + it.q0) * dp;
    pack_panels(k + src, hkv * d, cols, d, 1.f, BN, BN, dp, kt.data() + dst);
    pack_rows(v + src, hkv * d, cols, d, 1.f, BN, dp, vr.data() + dst);
  });

  std::vector<Item> items;
  for (int64_t s = 0; s < pr.num_segments; ++s) {
    const Segment& sg = pr.segments[s];
    for (int64_t q0 = 0; q0 < sg.q_len; q0 += BM) {
      const int64_t rows = std::min(BM, sg.q_len - q0);
      const int64_t keys = visible_keys(q0 + rows - 1, sg.q_len, sg.k_len, pr.causal);
      for (int64_t h = 0; h < hq; ++h) items.push_back({s, h, q0, rows * (keys + BN)});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });

  const float qscale = pr.scale * kLog2e;  // scores in log2 units: exp2 instead of exp
  parallel_items(int64_t(items.size()), [&](int64_t idx) {
    const Item& it = items[size_t(idx)];
    const Segment& sg = pr.segments[it.segment];
    const int64_t h = it.head, q0 = it.q0, hk = h / group;
    const int64_t rows = std::min(BM, sg.q_len - q0), rows_pad = round_up(rows, MR);
    const int64_t keys = visible_keys(q0 + rows - 1, sg.q_len, sg.k_len, pr.causal);

    thread_local Scratch sc;
    sc.q.resize(size_t(BM * dp)); sc.o.assign(size_t(BM * dp), 0.f);
    sc.s.resize(size_t(BM * BN)); sc.p.resize(size_t(BM * BN));
    sc.m.assign(size_t(BM), kNegInf); sc.l.assign(size_t(BM), 0.f);
    float *qp = sc.q.data(), *s = sc.s.data(), *pp = sc.p.data(), *o = sc.o.data();
    pack_panels(q + ((sg.q_start + q0) * hq + h) * d, hq * d, rows, d, qscale, MR, rows_pad, dp, qp);

    for (int64_t n0 = 0; n0 < keys; n0 += BN) {
      const int64_t cols = std::min(BN, keys - n0), cols_pad = round_up(cols, NR);
      const int64_t blk = (hk * k_total + k_off[it.segment] + n0) * dp;
      panel_gemm(qp, rows_pad, kt.data() + blk, BN, cols_pad, dp, s, BN, false);
      for (int64_t r = 0; r < rows_pad; ++r) {
        float* sr = s + r * BN;
        const int64_t valid =
            r < rows ? std::clamp<int64_t>(visible_keys(q0 + r, sg.q_len, sg.k_len, pr.causal) - n0, 0, cols) : 0;
        std::fill(sr + valid, sr + cols_pad, kNegInf);
        const float m_new = std::max(sc.m[r], row_max(sr, cols_pad));
        if (m_new == kNegInf) {
          std::fill(sr, sr + cols_pad, 0.f);
        } else {
          const float alpha = exp2f(sc.m[r] - m_new);
          sc.l[r] = sc.l[r] * alpha + exp2_shifted_sum(sr, cols_pad, m_new);
          sc.m[r] = m_new;
          if (alpha != 1.f) scale_row(o + r * dp, dp, alpha);
        }
        // P into row panels (the micro-kernel's A operand, depth = keys).
        float* panel = pp + (r / MR) * cols * MR + r % MR;
        for (int64_t j = 0; j < cols; ++j) panel[j * MR] = sr[j];
      }
      panel_gemm(pp, rows_pad, vr.data() + blk, dp, dp, cols, o, dp, true);
    }

    for (int64_t r = 0; r < rows; ++r) {
      const float l = sc.l[r], inv = l > 0.f ? 1.f / l : 0.f;
      T* dst = out + ((sg.q_start + q0 + r) * hq + h) * d;
      for (int64_t i = 0; i < d; ++i) from_float(o[r * dp + i] * inv, dst + i);
      lse[sg.lse_start + h * pr.lse_head_stride + q0 + r] = l > 0.f ? (sc.m[r] + std::log2(l)) * kLn2 : kNegInf;
    }
  });
}

}  // namespace

void forward_cpu(const Problem& p, const void* q, const void* k, const void* v, void* out, float* lse) {
  if (decode_applies(p)) return decode_forward(p, q, k, v, out, lse);
  dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    forward_tiled(p, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
                  static_cast<T*>(out), lse);
  });
}

void append_cpu(int64_t elem_size, const void* src, void* cache, int64_t batch, int64_t new_len,
                int64_t cache_len, int64_t row_elems, const int32_t* starts, int32_t start_if_null) {
  const int64_t row_bytes = row_elems * elem_size;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t start = starts ? starts[b] : start_if_null;
    std::memcpy(static_cast<char*>(cache) + (b * cache_len + start) * row_bytes,
                static_cast<const char*>(src) + b * new_len * row_bytes, size_t(new_len * row_bytes));
  }
}

}  // namespace cm3leon::attention
