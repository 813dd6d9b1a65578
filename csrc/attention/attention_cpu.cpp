// Tiled online-softmax attention forward (FlashAttention-2 style) on the CPU.
//
// The micro-kernel reads K and V from one fp32 copy made per call (bf16/fp16 are widened once), packed
// chunk by chunk on first use. A work item is (segment, query head, block of
// BM queries): S^T = K Q^T block by block with the micro-kernel, running max/sum per query, then
// O += P V with the same micro-kernel. The S x S matrix never exists; scratch per item is
// O(BM * (BN + head_dim)). Items are sorted by cost (causal blocks near the
// diagonal are cheap) and scheduled dynamically so both cores finish together.
#include "attention/attention_cpu.h"

#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "attention/attention_decode.h"
#include "attention/attention_tiles.h"
#include "common/parallel.h"
#include "common/scratch.h"

namespace cm3leon::attention {
CM3LEON_ISA_BEGIN
namespace {

// Measured on the 2-core AVX2 machine: 96 x 48 beats 48 x 48 by ~10% (D = 64); with V in strips, 96 x 72
// beats 96 x 48 by ~2% (D = 32..256, causal and not); 144 x 96 was no better than 96 x 72.
// With AMX, blocks are whole 32 x 32 tile blocks.
constexpr int64_t BM = 96;                // query rows per work item (multiple of MR and of NR)
constexpr int64_t BN = kAmx ? 96 : 72;    // keys per block (multiple of MR)
static_assert(BM % MR == 0 && BM % NR == 0 && BN % MR == 0, "blocks hold whole micro-kernel tiles");
static_assert(!kAmx || (BM % 32 == 0 && BN % 32 == 0), "blocks hold whole AMX blocks");

constexpr int64_t kPackKeys = 4 * BN;  // keys per K/V packing chunk (a multiple of BN)
enum PackState : int { kUnpacked = 0, kPacking = 1, kPacked = 2 };

struct Item {
  int64_t segment, head, q0, cost;
};

// Per-thread scratch, reused across items and calls.
struct Scratch {
  std::vector<float> qt, st, o, m, l, alpha, lo, hi, diag;
  std::vector<uint32_t> qt2, pt2;  // Q^T and P^T as bf16 pairs (kBf16Pairs; with AMX, pt2 holds P)
};

template <typename T>
using PackedWord = std::conditional_t<kBf16Pairs<T>, uint32_t, float>;

#if CM3LEON_AVX2
// Online-softmax step on a transposed score tile st[keys][BM], one query per lane (vertical reductions
// only). When `masked`, key r of the block is visible to query c iff lo[c] <= r < hi[c]; rows
// [keys, keys_pad) are padding and get P = 0. Leaves P in st, updates m and l, writes alpha.
inline void softmax_block(float* st, int64_t keys, int64_t keys_pad, int64_t queries, bool masked,
                          const float* lo, const float* hi, float* m, float* l, float* alpha) {
  using W = Wide;
  const W::V neg_inf = W::set1(kNegInf);
  for (int64_t c = 0; c < queries; c += W::kLanes) {
    const W::V lov = W::load(lo + c), hiv = W::load(hi + c);
    W::V mx = neg_inf;
    for (int64_t r = 0; r < keys; ++r) {
      W::V x = W::load(st + r * BM + c);
      if (masked) {
        const W::V rv = W::set1(float(r));
        x = select(both(lt(rv, hiv), ge(rv, lov)), x, neg_inf);
        W::store(st + r * BM + c, x);
      }
      mx = max(mx, x);
    }
    const W::V m_old = W::load(m + c), m_new = max(m_old, mx);
    // Queries that have seen no key yet keep m = -inf; subtracting 0 then gives e^-inf = 0, not NaN.
    const W::V m_use = select(eq(m_new, neg_inf), W::zero(), m_new);
    const W::V a = exp_diff<W>(m_old, m_use);
    W::V sum0 = W::zero(), sum1 = sum0;
    int64_t r = 0;
    for (; r + 2 <= keys; r += 2) {
      const W::V p0 = exp_diff<W>(W::load(st + r * BM + c), m_use);
      const W::V p1 = exp_diff<W>(W::load(st + (r + 1) * BM + c), m_use);
      W::store(st + r * BM + c, p0);
      W::store(st + (r + 1) * BM + c, p1);
      sum0 = add(sum0, p0);
      sum1 = add(sum1, p1);
    }
    for (; r < keys; ++r) {
      const W::V p0 = exp_diff<W>(W::load(st + r * BM + c), m_use);
      W::store(st + r * BM + c, p0);
      sum0 = add(sum0, p0);
    }
    for (; r < keys_pad; ++r) W::store(st + r * BM + c, W::zero());
    W::store(l + c, fmadd(W::load(l + c), a, add(sum0, sum1)));
    W::store(m + c, m_new);
    W::store(alpha + c, a);
  }
}
#else
inline void softmax_block(float* st, int64_t keys, int64_t keys_pad, int64_t queries, bool masked,
                          const float* lo, const float* hi, float* m, float* l, float* alpha) {
  for (int64_t c = 0; c < queries; ++c) {
    float mx = kNegInf;
    for (int64_t r = 0; r < keys; ++r) {
      if (masked && (float(r) < lo[c] || float(r) >= hi[c])) st[r * BM + c] = kNegInf;
      mx = std::max(mx, st[r * BM + c]);
    }
    const float m_new = std::max(m[c], mx), m_use = m_new == kNegInf ? 0.f : m_new;
    alpha[c] = std::exp(m[c] - m_use);
    float sum = 0.f;
    for (int64_t r = 0; r < keys; ++r) sum += (st[r * BM + c] = std::exp(st[r * BM + c] - m_use));
    for (int64_t r = keys; r < keys_pad; ++r) st[r * BM + c] = 0.f;
    l[c] = l[c] * alpha[c] + sum;
    m[c] = m_new;
  }
}
#endif

// Scores are computed transposed, S^T = K Q^T ([keys][queries]): the softmax then reduces vertically
// (eight queries per vector, no horizontal sums), and P^T serves directly as the A operand of O += P V
// (six query columns per micro-kernel step), so no tile is ever transposed.
template <typename T>
void forward_tiled(const Problem& pr, const T* q, const T* k, const T* v, T* out, float* lse) {
  const int64_t d = pr.head_dim, dp = round_up(d, NR), hq = pr.heads_q, hkv = pr.heads_kv;
  const int64_t group = hq / hkv;
  constexpr bool pairs = kBf16Pairs<T>, amx = pairs && kAmx;
  const int64_t row_words = pairs ? dp / 2 : dp;  // packed words per key row (floats, or bf16 pairs)
  const int64_t key_align = amx ? 32 : MR;         // packed key rows per chunk: whole tiles

  // K and V in fp32, packed once per call (bf16/fp16 widened once): block n0 of segment s, kv head h starts
  // at word (h * k_total + k_off[s] + n0) * row_words; K as rows of dp floats, V as NR-column strips per
  // block (pack_strips), or both as bf16 pairs (kBf16Pairs). Even fp32 is copied: in place, consecutive keys
  // of one head lie heads_kv * head_dim floats apart (4 KiB for 16 x 64), all in the same L1 sets.
  std::vector<int64_t> k_off(size_t(pr.num_segments) + 1, 0);
  for (int64_t s = 0; s < pr.num_segments; ++s) k_off[s + 1] = k_off[s] + round_up(pr.segments[s].k_len, BN);
  const int64_t k_total = k_off.back();
  // Rows past a block's last multiple of MR stay unwritten: no micro-kernel step reads them.
  const ScratchBuffer<PackedWord<T>> kr(size_t(hkv * k_total * row_words)), vr(size_t(hkv * k_total * row_words));
  // Chunks of kPackKeys keys per (segment, kv head) are packed on first use by the thread that needs them,
  // so the memory-bound packing overlaps the other thread's compute and the chunk is in L2 when used.
  std::vector<int64_t> chunk_off(size_t(pr.num_segments) + 1, 0);  // first chunk of segment s, kv head 0
  for (int64_t s = 0; s < pr.num_segments; ++s)
    chunk_off[s + 1] = chunk_off[s] + hkv * ceil_div(pr.segments[s].k_len, kPackKeys);
  std::unique_ptr<std::atomic<int>[]> chunk_state(new std::atomic<int>[size_t(chunk_off.back())]());
  auto ensure_packed = [&](int64_t s, int64_t h, int64_t n0) {  // the chunk holding key block n0
    const Segment& sg = pr.segments[s];
    const int64_t c0 = n0 / kPackKeys * kPackKeys;
    const int64_t chunk = chunk_off[s] + h * ceil_div(sg.k_len, kPackKeys) + c0 / kPackKeys;
    std::atomic<int>& state = chunk_state[size_t(chunk)];
    if (state.load(std::memory_order_acquire) == kPacked) return;
    int expected = kUnpacked;
    if (state.compare_exchange_strong(expected, kPacking, std::memory_order_acq_rel)) {
      const int64_t keys = std::min(kPackKeys, sg.k_len - c0), keys_pad = round_up(keys, key_align);
      const int64_t src = ((sg.k_start + c0) * hkv + h) * d, dst = (h * k_total + k_off[s] + c0) * row_words;
      if constexpr (pairs) {
        pack_pair_rows(k + src, hkv * d, keys, d, keys_pad, dp, kr.data() + dst);
        pack_pair_strips(v + src, hkv * d, keys, d, keys_pad, BN, dp, vr.data() + dst);
      } else {
        pack_rows(k + src, hkv * d, keys, d, 1.f, keys_pad, dp, kr.data() + dst);
        pack_strips(v + src, hkv * d, keys, d, keys_pad, BN, dp, vr.data() + dst);
      }
      state.store(kPacked, std::memory_order_release);
      return;
    }
    while (state.load(std::memory_order_acquire) != kPacked) std::this_thread::yield();  // packed elsewhere
  };
  std::vector<Item> items;
  for (int64_t s = 0; s < pr.num_segments; ++s) {
    const Segment& sg = pr.segments[s];
    const KeyWindow win(pr, sg);
    for (int64_t q0 = 0; q0 < sg.q_len; q0 += BM) {
      const int64_t rows = std::min(BM, sg.q_len - q0);
      const int64_t keys = std::max<int64_t>(win.hi(q0 + rows - 1) - win.lo(q0), 0);
      for (int64_t h = 0; h < hq; ++h) items.push_back({s, h, q0, rows * (keys + BN)});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });

  // Scores in natural units, as the backward recomputes them (exp_diff). With softcap, Q carries
  // scale / softcap: the tile holds the tanh argument and modify_scores rescales it.
  const float qscale = pr.softcap > 0.f ? pr.scale / pr.softcap : pr.scale;
  parallel_items(pr.threads, int64_t(items.size()), [&](int64_t idx) {
    const Item& it = items[size_t(idx)];
    const Segment& sg = pr.segments[it.segment];
    const KeyWindow win(pr, sg);
    const int64_t h = it.head, q0 = it.q0, hk = h / group, last = q0 + std::min(BM, sg.q_len - q0) - 1;
    const int64_t rows = last - q0 + 1, rows16 = round_up(rows, NR), rows6 = round_up(rows, MR);
    const float slope = pr.alibi_slopes ? pr.alibi_slopes[it.segment * pr.alibi_segment_stride + h] : 0.f;
    // Key blocks (aligned to BN, as packed) from the first query's first key to the last query's last one;
    // a block needs the mask unless every query sees all of it.
    const int64_t k_begin = win.lo(q0) / BN * BN, k_end = win.hi(last);

    [[maybe_unused]] const AmxSession tiles(amx);
    thread_local Scratch sc;
    sc.st.resize(size_t(BN * BM)); sc.o.assign(size_t(BM * dp), 0.f);
    sc.m.assign(size_t(BM), kNegInf); sc.l.assign(size_t(BM), 0.f); sc.alpha.resize(size_t(BM));
    sc.lo.resize(size_t(BM)); sc.hi.resize(size_t(BM)); sc.diag.resize(size_t(BM));
    const T* q_rows = q + ((sg.q_start + q0) * hq + h) * d;
    const PackedWord<T>* qt;  // Q^T, [row_words][BM]
    if constexpr (pairs) {
      sc.qt2.resize(size_t(dp / 2 * BM)); sc.pt2.resize(size_t(BN / 2 * BM));
      pack_pair_panels(q_rows, hq * d, rows, d, BM, BM, dp, sc.qt2.data());  // unscaled
      qt = sc.qt2.data();
    } else {
      sc.qt.resize(size_t(dp * BM));
      pack_panels(q_rows, hq * d, rows, d, qscale, BM, BM, dp, sc.qt.data());
      qt = sc.qt.data();
    }
    float *st = sc.st.data(), *o = sc.o.data();

    for (int64_t n0 = k_begin; n0 < k_end; n0 += BN) {
      const int64_t cols = std::min(BN, k_end - n0), cols6 = round_up(cols, MR);
      const int64_t blk = (hk * k_total + k_off[it.segment] + n0) * row_words;
      const bool masked = win.lo(last) > n0 || win.hi(q0) < n0 + cols;
      ensure_packed(it.segment, hk, n0);
      for (int64_t r = 0; r < BM; ++r) {  // padding queries see nothing
        sc.lo[size_t(r)] = r < rows ? float(win.lo(q0 + r) - n0) : 0.f;
        sc.hi[size_t(r)] = r < rows ? float(win.hi(q0 + r) - n0) : 0.f;
        sc.diag[size_t(r)] = float(q0 + r + win.shift - n0);
      }
      // Six K rows (padding rows are zero) x NR queries; tiles that every one of their queries masks out are
      // skipped (the softmax masks their stale scores). AMX computes the whole block in 32 x 32 blocks.
      if constexpr (amx) {
        for (int64_t kr0 = 0; kr0 < cols; kr0 += 32)
          for (int64_t qc = 0; qc < rows16; qc += 32)
            amx_block(kr.data() + blk + kr0 * row_words, row_words, qt + qc, BM, row_words,
                      st + kr0 * BM + qc, BM, false);
      } else {
        for (int64_t kr0 = 0; kr0 < cols6; kr0 += MR)
          for (int64_t qc = 0; qc < rows16; qc += NR) {
            const int64_t qe = std::min(qc + NR, rows) - 1;
            if (masked && !(n0 + kr0 < win.hi(q0 + qe) && n0 + kr0 + MR > win.lo(q0 + qc))) continue;
            micro_tile(kr.data() + blk + kr0 * row_words, 1, row_words, qt + qc, BM, row_words,
                       st + kr0 * BM + qc, BM, false);
          }
      }
      if constexpr (pairs)
        for (int64_t r = 0; r < cols; ++r) scale_row(st + r * BM, rows16, qscale);
      if (pr.softcap > 0.f || slope != 0.f)
        modify_scores(st, BM, cols, rows16, pr.softcap, slope, sc.diag.data(), nullptr);
      softmax_block(st, cols, cols6, rows16, masked, sc.lo.data(), sc.hi.data(), sc.m.data(), sc.l.data(),
                    sc.alpha.data());
      if (pr.dropout.threshold) {  // after the sums: l (hence lse) is that of the undropped probabilities
        const uint32_t stream = uint32_t(it.segment * hq + h);
        for (int64_t r = 0; r < rows; ++r)
          dropout_row(pr.dropout, stream, uint32_t(q0 + r), std::max(win.lo(q0 + r), n0),
                      std::min(win.hi(q0 + r), n0 + cols), [&](int64_t j, bool kept) {
                        if (!kept) st[(j - n0) * BM + r] = 0.f;
                      });
      }
      for (int64_t r = 0; r < rows; ++r)
        if (sc.alpha[size_t(r)] != 1.f) scale_row(o + r * dp, dp, sc.alpha[size_t(r)]);
      if constexpr (amx) {  // P as rows of key pairs, then 32 x 32 output blocks over whole 32-key steps
        const int64_t cols32 = round_up(cols, 32);
        round_col_pairs(st, BM, cols, cols32, rows16, sc.pt2.data(), BN / 2);
        for (int64_t qr = 0; qr < rows16; qr += 32)
          for (int64_t dc = 0; dc < dp; dc += 32)
            amx_block(sc.pt2.data() + qr * (BN / 2), BN / 2, vr.data() + blk + dc * BN / 2, NR, cols32 / 2,
                      o + qr * dp + dc, dp, true);
        continue;
      }
      if constexpr (pairs) round_row_pairs(st, BM, cols6, rows6, sc.pt2.data());
      for (int64_t dc = 0; dc < dp; dc += NR)  // an NR-column strip of V stays in L1 across query panels
        for (int64_t qr = 0; qr < rows6; qr += MR) {
          // Keys outside what these six queries see have P = 0: the depth covers only their union.
          int64_t k0 = 0, k1 = cols;
          if (masked) {
            k0 = std::clamp<int64_t>(win.lo(q0 + qr) - n0, 0, cols);
            k1 = std::clamp<int64_t>(win.hi(q0 + std::min(qr + MR, rows) - 1) - n0, k0, cols);
          }
          if (k1 <= k0) continue;
          if constexpr (pairs) {  // whole pairs of keys (cols6 is even; P is 0 past each query's keys)
            k0 &= ~int64_t(1);
            k1 = round_up(k1, 2);
            micro_tile(sc.pt2.data() + k0 / 2 * BM + qr, BM, 1, vr.data() + blk + dc * BN / 2 + k0 / 2 * NR,
                       NR, (k1 - k0) / 2, o + qr * dp + dc, dp, true);
          } else {
            micro_tile(st + k0 * BM + qr, BM, 1, vr.data() + blk + dc * BN + k0 * NR, NR, k1 - k0,
                       o + qr * dp + dc, dp, true);
          }
        }
    }

    for (int64_t r = 0; r < rows; ++r) {
      // l == 0: the row saw no key (output 0, lse -inf); a NaN l (NaN or inf inputs) gives NaN, as PyTorch.
      // lse = m + ln l is exactly the max score when l == 1 (one key, or the others underflow).
      const float l = sc.l[size_t(r)], inv = l == 0.f ? 0.f : pr.dropout_scale / l;
      T* dst = out + ((sg.q_start + q0 + r) * hq + h) * d;
      for (int64_t i = 0; i < d; ++i) from_float(o[r * dp + i] * inv, dst + i);
      lse[sg.lse_start + h * pr.lse_head_stride + q0 + r] =
          l == 0.f ? kNegInf : sc.m[size_t(r)] + std::log(l);
    }
  });
}

}  // namespace

void forward(const Problem& p, const void* q, const void* k, const void* v, void* out, float* lse) {
  if (!p.dropout.threshold && decode_applies(p)) return decode_forward(p, q, k, v, out, lse);  // decode: no dropout
  dispatch_float(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    forward_tiled(p, static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
                  static_cast<T*>(out), lse);
  });
}

CM3LEON_ISA_END

template <>
void forward_kernel<kIsa>(const Problem& p, const void* q, const void* k, const void* v, void* out, float* lse) {
  forward(p, q, k, v, out, lse);
}

}  // namespace cm3leon::attention
