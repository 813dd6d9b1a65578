// Attention backward on the CPU (FlashAttention-2 algorithm): probabilities are recomputed block by block
// from the saved log-sum-exp, never stored.
//
// Preprocessing packs Q and dO in fp32 per block of BM queries, both transposed (B operands of S^T = K Q^T
// and dP^T = V dO^T) and as NR-column strips (B operands of dK and dV, see pack_strips), and computes
// D = rowsum(dO * O) per query row. A work item is (segment, kv head, block of BN keys): it keeps its dK/dV
// block in registers-and-L1 scratch while it sweeps the query heads of its GQA group and the query blocks
// that can see it (causal: the ones at or below the diagonal), so GQA gradients are summed in place.
// Per (query block, key block) everything is kept transposed ([keys][queries]), as in the forward:
// S^T = K Q^T, dP^T = V dO^T, P^T = e^(S^T - lse), dS^T = P^T (dP^T - D) with vertical (per-query) vectors,
// then dV += P^T dO, dK += dS^T Q (six key rows per micro-kernel step) and dQ += dS K (six query columns
// of dS^T per step): no tile is ever transposed. dQ rows are shared between items, so each thread
// accumulates into its own fp32 dQ buffer and the buffers are summed at the end (no atomics); that sum's
// order depends on the schedule, so the deterministic mode computes dQ in a second pass instead, one owner
// per query block. Local windows restrict both passes to the blocks that see each other; softcap and ALiBi
// modify the recomputed scores as in the forward (modify_scores). Dropout regenerates the forward's mask per
// tile (dropout_row): dV takes the dropped, scaled P and dP is dropped and scaled likewise before dS.
// bf16 inputs at levels with bf16 dot products (kBf16Pairs) run the same schedule with every operand packed as
// bf16 pairs (the same layouts, two depth steps per word) and P^T and dS^T rounded to bf16 where they are A
// operands; with AMX the five products run as 32 x 32 tile blocks.
#include <omp.h>

#include <algorithm>
#include <numeric>
#include <type_traits>
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
// With AMX (bf16 scores from tiles, as the forward computes them), key blocks are whole 32-key tile blocks.
constexpr int64_t BN = kAmx ? 96 : 144;  // keys per work item (multiple of MR)
static_assert(BM % MR == 0 && BM % NR == 0 && BN % MR == 0, "blocks hold whole micro-kernel tiles");
static_assert(!kAmx || (BM % 32 == 0 && BN % 32 == 0), "blocks hold whole AMX blocks");

struct Item {
  int64_t segment, head_kv, n0, cost;
};

struct Scratch {
  std::vector<float> dk, dv, s, dp, t, keep, lo, hi, diag, dq;
  // With bf16 pairs: P^T and dS^T rounded to bf16, queries paired ([BN][BM / 2], A operands of dV and dK), and
  // dS^T with keys paired (the A operand of dQ: [BN / 2][BM], or [BM][BN / 2] for AMX).
  std::vector<uint32_t> p2, ds2, ds2_keys;
};

// P^T = e^(S^T - lse) and dS^T = P^T (dP^T - D) on [BN keys][BM queries] tiles, in place; key r of the
// block is visible to query c when lo[c] <= r < hi[c] (lo = hi = 0 for padding queries). With softcap, t
// holds tanh of the pre-cap scores and dS^T is taken through the cap: times 1 - t^2. With dropout, z holds
// 1 / (1 - p) for kept and 0 for dropped elements: s gets P^T z (for dV) and dS^T = P^T (dP^T z - D).
inline void softmax_grad_block(float* s, float* dp, const float* t, const float* z, const float* lse,
                               const float* dsum, const float* lo, const float* hi) {
#if CM3LEON_AVX2
  using W = Wide;
  const W::V one = W::set1(1.f);
  for (int64_t c = 0; c < BM; c += W::kLanes) {
    const W::V lv = W::load(lse + c), dv = W::load(dsum + c), lov = W::load(lo + c), hiv = W::load(hi + c);
    for (int64_t r = 0; r < BN; ++r) {
      const W::V rv = W::set1(float(r));
      const W::V p = keep(both(lt(rv, hiv), ge(rv, lov)), exp_diff<W>(W::load(s + r * BM + c), lv));
      W::V dpv = W::load(dp + r * BM + c);
      if (z) {
        const W::V zv = W::load(z + r * BM + c);
        W::store(s + r * BM + c, mul(p, zv));
        dpv = mul(dpv, zv);
      } else {
        W::store(s + r * BM + c, p);
      }
      W::V ds = mul(p, sub(dpv, dv));
      if (t) {
        const W::V th = W::load(t + r * BM + c);
        ds = mul(ds, fnmadd(th, th, one));
      }
      W::store(dp + r * BM + c, ds);
    }
  }
#else
  for (int64_t r = 0; r < BN; ++r)
    for (int64_t c = 0; c < BM; ++c) {
      const bool keep = float(r) >= lo[c] && float(r) < hi[c];
      const float p = keep ? std::exp(s[r * BM + c] - lse[c]) : 0.f, zv = z ? z[r * BM + c] : 1.f;
      s[r * BM + c] = p * zv;
      const float ds = p * (dp[r * BM + c] * zv - dsum[c]);
      dp[r * BM + c] = t ? ds * (1.f - t[r * BM + c] * t[r * BM + c]) : ds;
    }
#endif
}

template <typename T>
void backward(const Problem& pr, const T* q, const T* k, const T* v, const T* out, const float* lse,
              const T* dout, T* dq, T* dk, T* dv) {
  const int64_t d = pr.head_dim, dp = round_up(d, NR), hq = pr.heads_q, hkv = pr.heads_kv;
  const int64_t group = hq / hkv;
  // Scores in natural units, computed exactly as the forward did (same packing, micro-kernel and
  // modify_scores), so the saved lse reproduces the forward's probabilities; with softcap, Q carries
  // scale / softcap (the tanh argument, see modify_scores).
  const bool capped = pr.softcap > 0.f;
  const float qscale = capped ? pr.scale / pr.softcap : pr.scale;
  // With bf16 pairs every product takes bf16 operands: Q, K, V and dO as given, P and dS rounded to bf16 (as
  // FlashAttention's GPU kernels do); S^T exactly as the forward computes it. Packed operands then hold
  // Words, pairs of depth steps, and their offsets count words: `per_word` elements each.
  constexpr bool pairs = kBf16Pairs<T>, amx = pairs && kAmx;
  using Word = std::conditional_t<pairs, uint32_t, float>;
  constexpr int64_t per_word = pairs ? 2 : 1;
  const int64_t dw = dp / per_word;  // words per packed row of head_dim elements
  constexpr int64_t bmw = BM / per_word;  // words per tile row of queries

  // Query-side operands, packed once: row q0 of segment s, head h at (h * q_total + q_off[s] + q0) * dp.
  std::vector<int64_t> q_off(size_t(pr.num_segments) + 1, 0);
  for (int64_t s = 0; s < pr.num_segments; ++s) q_off[s + 1] = q_off[s] + round_up(pr.segments[s].q_len, BM);
  const int64_t q_total = q_off.back();
  const size_t qsize = size_t(hq * q_total * dp);  // floats of one per-thread dQ buffer
  const ScratchBuffer<Word> q_t(qsize / per_word), q_rows(qsize / per_word), do_t(qsize / per_word),
      do_rows(qsize / per_word);
  const ScratchBuffer<float> lse_rows(size_t(hq * q_total)), dsum(size_t(hq * q_total));
  std::vector<Item> pre;
  for (int64_t s = 0; s < pr.num_segments; ++s)
    for (int64_t h = 0; h < hq; ++h)
      for (int64_t q0 = 0; q0 < pr.segments[s].q_len; q0 += BM) pre.push_back({s, h, q0, 0});
  parallel_items(pr.threads, int64_t(pre.size()), [&](int64_t i) {
    const Item& it = pre[size_t(i)];
    const Segment& sg = pr.segments[it.segment];
    const int64_t h = it.head_kv, q0 = it.n0, rows = std::min(BM, sg.q_len - q0);
    const int64_t src = ((sg.q_start + q0) * hq + h) * d, row = h * q_total + q_off[it.segment] + q0;
    if constexpr (pairs) {  // Q^T unscaled (the scale follows in fp32, as in the forward)
      pack_pair_panels(q + src, hq * d, rows, d, BM, BM, dp, q_t.data() + row * dw);
      pack_pair_strips(q + src, hq * d, rows, d, BM, BM, dp, q_rows.data() + row * dw);
      pack_pair_panels(dout + src, hq * d, rows, d, BM, BM, dp, do_t.data() + row * dw);
      pack_pair_strips(dout + src, hq * d, rows, d, BM, BM, dp, do_rows.data() + row * dw);
    } else {
      pack_panels(q + src, hq * d, rows, d, qscale, BM, BM, dp, q_t.data() + row * dp);  // [dp][BM]
      pack_strips(q + src, hq * d, rows, d, BM, BM, dp, q_rows.data() + row * dp);
      pack_panels(dout + src, hq * d, rows, d, 1.f, BM, BM, dp, do_t.data() + row * dp);
      pack_strips(dout + src, hq * d, rows, d, BM, BM, dp, do_rows.data() + row * dp);
    }
    for (int64_t r = 0; r < BM; ++r) {
      if (r >= rows) {  // padding queries: finite values, masked out by their limit
        dsum[size_t(row + r)] = 0.f;
        lse_rows[size_t(row + r)] = 0.f;
        continue;
      }
      const T *o = out + src + r * hq * d, *g = dout + src + r * hq * d;
      float acc = 0.f;
      for (int64_t c = 0; c < d; ++c) acc += to_float(g[c]) * to_float(o[c]);
      dsum[size_t(row + r)] = acc;
      const float l = lse[sg.lse_start + h * pr.lse_head_stride + q0 + r];
      // A row that saw no key (lse = -inf) has every probability masked; +inf keeps e^(s - lse) at 0.
      lse_rows[size_t(row + r)] = l == kNegInf ? -kNegInf : l;
    }
  });

  // Key-side operands, packed once as rows of dp floats: block n0 of segment s, kv head h at
  // (h * k_total + k_off[s] + n0) * dp, zero rows up to the block's end.
  std::vector<int64_t> k_off(size_t(pr.num_segments) + 1, 0);
  std::vector<Item> items;  // (segment, kv head, key block): the dK/dV work items
  for (int64_t s = 0; s < pr.num_segments; ++s) {
    const Segment& sg = pr.segments[s];
    const KeyWindow win(pr, sg);
    k_off[s + 1] = k_off[s] + round_up(sg.k_len, BN);
    for (int64_t n0 = 0; n0 < sg.k_len; n0 += BN) {
      const int64_t cols = std::min(BN, sg.k_len - n0);
      const int64_t queries = std::max<int64_t>(win.end_query(n0 + cols) - win.first_query(n0), 0);
      for (int64_t h = 0; h < hkv; ++h) items.push_back({s, h, n0, (queries + BM) * group});
    }
  }
  const int64_t k_total = k_off.back();
  const size_t kwords = size_t(hkv * k_total * dw);
  const ScratchBuffer<Word> k_rows(kwords), v_rows(kwords);
  // With pairs, dQ += dS K needs K with *keys* paired: NR-column strips per key block (fp32 reads K's rows).
  const ScratchBuffer<uint32_t> k_strips(pairs ? kwords : 0);
  parallel_items(pr.threads, int64_t(items.size()), [&](int64_t i) {
    const Item& it = items[size_t(i)];
    const Segment& sg = pr.segments[it.segment];
    const int64_t cols = std::min(BN, sg.k_len - it.n0), src = ((sg.k_start + it.n0) * hkv + it.head_kv) * d;
    const int64_t dst = (it.head_kv * k_total + k_off[it.segment] + it.n0) * dw;
    if constexpr (pairs) {
      pack_pair_rows(k + src, hkv * d, cols, d, BN, dp, k_rows.data() + dst);
      pack_pair_rows(v + src, hkv * d, cols, d, BN, dp, v_rows.data() + dst);
      pack_pair_strips(k + src, hkv * d, cols, d, BN, BN, dp, k_strips.data() + dst);
    } else {
      pack_rows(k + src, hkv * d, cols, d, 1.f, BN, dp, k_rows.data() + dst);
      pack_rows(v + src, hkv * d, cols, d, 1.f, BN, dp, v_rows.data() + dst);
    }
  });
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });

  // One (query block of head h, key block n0) step: leaves P^T in sc.s and dS^T (natural units, before the
  // final scale) in sc.dp, both [BN keys][BM queries] (with pairs, also dS^T rounded in sc.ds2_keys).
  // Returns the query-side row and the key block's word offset.
  auto grad_tile = [&](Scratch& sc, int64_t seg, int64_t h, int64_t q0, int64_t n0) {
    const Segment& sg = pr.segments[seg];
    const KeyWindow win(pr, sg);
    const int64_t rows = std::min(BM, sg.q_len - q0), rows16 = round_up(rows, NR);
    const int64_t cols = std::min(BN, sg.k_len - n0);
    for (int64_t c = 0; c < BM; ++c) {
      sc.lo[size_t(c)] = c < rows ? float(std::clamp<int64_t>(win.lo(q0 + c) - n0, 0, cols)) : 0.f;
      sc.hi[size_t(c)] = c < rows ? float(std::clamp<int64_t>(win.hi(q0 + c) - n0, 0, cols)) : 0.f;
      sc.diag[size_t(c)] = float(q0 + c + win.shift - n0);
    }
    const int64_t row = h * q_total + q_off[seg] + q0, blk = ((h / group) * k_total + k_off[seg] + n0) * dw;
    const Word *qt = q_t.data() + row * dw, *dot = do_t.data() + row * dw;
    const Word *kr = k_rows.data() + blk, *vr = v_rows.data() + blk;
    float *s = sc.s.data(), *dpt = sc.dp.data();
    if constexpr (amx) {  // S^T = K Q^T, dP^T = V dO^T
      for (int64_t r0 = 0; r0 < BN; r0 += 32)
        for (int64_t c = 0; c < rows16; c += 32) {
          amx_block(kr + r0 * dw, dw, qt + c, BM, dw, s + r0 * BM + c, BM, false);
          amx_block(vr + r0 * dw, dw, dot + c, BM, dw, dpt + r0 * BM + c, BM, false);
        }
    } else {
      for (int64_t r0 = 0; r0 < BN; r0 += MR)
        for (int64_t c = 0; c < rows16; c += NR) {
          micro_tile(kr + r0 * dw, 1, dw, qt + c, BM, dw, s + r0 * BM + c, BM, false);
          micro_tile(vr + r0 * dw, 1, dw, dot + c, BM, dw, dpt + r0 * BM + c, BM, false);
        }
    }
    if constexpr (pairs)
      for (int64_t r = 0; r < BN; ++r) scale_row(s + r * BM, rows16, qscale);
    const float slope = pr.alibi_slopes ? pr.alibi_slopes[seg * pr.alibi_segment_stride + h] : 0.f;
    float* t = capped ? sc.t.data() : nullptr;
    if (capped || slope != 0.f) modify_scores(s, BM, BN, BM, pr.softcap, slope, sc.diag.data(), t);
    float* z = nullptr;
    if (pr.dropout.threshold) {  // the forward's mask over the visible keys; 0 elsewhere (P is 0 there)
      z = sc.keep.data();
      std::fill(sc.keep.begin(), sc.keep.end(), 0.f);
      for (int64_t c = 0; c < rows; ++c)
        dropout_row(pr.dropout, uint32_t(seg * hq + h), uint32_t(q0 + c), n0 + int64_t(sc.lo[size_t(c)]),
                    n0 + int64_t(sc.hi[size_t(c)]), [&](int64_t j, bool kept) {
                      if (kept) z[(j - n0) * BM + c] = pr.dropout_scale;
                    });
    }
    softmax_grad_block(s, dpt, t, z, lse_rows.data() + row, dsum.data() + row, sc.lo.data(), sc.hi.data());
    if constexpr (amx) round_col_pairs(dpt, BM, BN, BN, round_up(rows, 32), sc.ds2_keys.data(), BN / 2);
    else if constexpr (pairs) round_row_pairs(dpt, BM, BN, BM, sc.ds2_keys.data());
    return std::pair<int64_t, int64_t>{row, blk};
  };
  auto new_scratch = [&] {  // dk/dv/dq are sized by their users
    Scratch sc;
    sc.s.resize(size_t(BN * BM)); sc.dp.resize(size_t(BN * BM));
    sc.t.resize(capped ? size_t(BN * BM) : 0);
    sc.keep.resize(pr.dropout.threshold ? size_t(BN * BM) : 0);
    sc.lo.resize(size_t(BM)); sc.hi.resize(size_t(BM)); sc.diag.resize(size_t(BM));
    sc.ds2_keys.resize(pairs ? size_t(BN * BM / 2) : 0);
    return sc;
  };
  // dQ += dS K for one tile (key block at word `blk`), into a [dp / NR][BM][NR] strip buffer: six query
  // columns of dS^T per step and K's rows, or with pairs dS^T's key pairs and K's key-paired strips.
  auto add_dq = [&](const Scratch& sc, int64_t blk, int64_t rows, float* dq_strips) {
    if constexpr (amx) {
      for (int64_t c = 0; c < dp; c += NR)
        for (int64_t qr = 0; qr < rows; qr += 32)
          amx_block(sc.ds2_keys.data() + qr * (BN / 2), BN / 2, k_strips.data() + blk + c * BN / 2, NR, BN / 2,
                    dq_strips + c * BM + qr * NR, NR, true);
      return;
    }
    for (int64_t c = 0; c < dp; c += NR)
      for (int64_t qr = 0; qr < round_up(rows, MR); qr += MR) {
        if constexpr (pairs)
          micro_tile(sc.ds2_keys.data() + qr, BM, 1, k_strips.data() + blk + c * BN / 2, NR, BN / 2,
                     dq_strips + c * BM + qr * NR, NR, true);
        else
          micro_tile(sc.dp.data() + qr, BM, 1, k_rows.data() + blk + c, dp, BN, dq_strips + c * BM + qr * NR, NR,
                     true);
      }
  };
  // dQ = scale * (the sum of `nbuf` strip buffers `stride` floats apart) of one query block, in q's layout.
  auto write_dq = [&](const Item& it, const float* acc_strips, int nbuf, size_t stride) {
    const Segment& sg = pr.segments[it.segment];
    const int64_t h = it.head_kv, q0 = it.n0, rows = std::min(BM, sg.q_len - q0);
    for (int64_t r = 0; r < rows; ++r) {
      T* dst = dq + ((sg.q_start + q0 + r) * hq + h) * d;
      for (int64_t c = 0; c < d; ++c) {
        float acc = 0.f;
        const size_t at = size_t((c / NR) * BM * NR + r * NR + c % NR);
        for (int b = 0; b < nbuf; ++b) acc += acc_strips[size_t(b) * stride + at];
        from_float(acc * pr.scale, dst + c);
      }
    }
  };

  // Deterministic: dQ gets its own pass below (one owner per query block, key blocks in order), so no
  // per-thread buffers are needed here.
  const int team = usable_threads(pr.threads), nt = pr.deterministic ? 0 : team;
  // Per-thread dQ / scale in fp32, laid out like q_rows (NR-column strips per query block) so that every
  // micro-kernel tile of dQ is contiguous.
  const ScratchBuffer<float> dq_acc(size_t(nt) * qsize);

#pragma omp parallel num_threads(team)
  {
    // Zeroed by the team (each buffer's pages then start on its thread), all nt even if the team is smaller.
#pragma omp for schedule(static)
    for (int t = 0; t < nt; ++t) std::fill_n(dq_acc.data() + size_t(t) * qsize, qsize, 0.f);
    float* my_dq = nt ? dq_acc.data() + size_t(omp_get_thread_num()) * qsize : nullptr;
    [[maybe_unused]] const AmxSession tiles(amx);
    Scratch sc = new_scratch();
    sc.dk.resize(size_t(BN * dp)); sc.dv.resize(size_t(BN * dp));
    sc.p2.resize(pairs ? size_t(BN * BM / 2) : 0); sc.ds2.resize(pairs ? size_t(BN * BM / 2) : 0);
#pragma omp for schedule(dynamic, 1)
    for (int64_t idx = 0; idx < int64_t(items.size()); ++idx) {
      const Item& it = items[size_t(idx)];
      const Segment& sg = pr.segments[it.segment];
      const KeyWindow win(pr, sg);
      const int64_t hk = it.head_kv, n0 = it.n0, cols = std::min(BN, sg.k_len - n0);
      std::fill(sc.dk.begin(), sc.dk.end(), 0.f);
      std::fill(sc.dv.begin(), sc.dv.end(), 0.f);
      const int64_t q_end = win.end_query(n0 + cols);
      for (int64_t q0 = win.first_query(n0) / BM * BM; q0 < q_end; q0 += BM) {
        const int64_t rows = std::min(BM, sg.q_len - q0);
        for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          const auto [row, blk] = grad_tile(sc, it.segment, h, q0, n0);
          const Word *p_op, *ds_op;  // P^T and dS^T, the A operands of dV and dK
          if constexpr (pairs) {
            round_neighbour_pairs(sc.s.data(), BN * BM, sc.p2.data());
            round_neighbour_pairs(sc.dp.data(), BN * BM, sc.ds2.data());
            p_op = sc.p2.data();
            ds_op = sc.ds2.data();
          } else {
            p_op = sc.s.data();
            ds_op = sc.dp.data();
          }
          const Word *dor = do_rows.data() + row * dw, *qr = q_rows.data() + row * dw;
          // dV += P^T dO, dK += dS^T Q over the block's queries (padding ones have P = dS = 0); AMX takes
          // them in steps of 32, which the score tile covers (rows16 is a multiple of 32 there).
          if constexpr (amx) {
            const int64_t depth = round_up(rows, 32) / 2;
            for (int64_t r0 = 0; r0 < BN; r0 += 32)
              for (int64_t c = 0; c < dp; c += NR) {
                amx_block(p_op + r0 * bmw, bmw, dor + c * bmw, NR, depth, sc.dv.data() + r0 * dp + c, dp, true);
                amx_block(ds_op + r0 * bmw, bmw, qr + c * bmw, NR, depth, sc.dk.data() + r0 * dp + c, dp, true);
              }
          } else {
            const int64_t depth = ceil_div(rows, per_word);
            for (int64_t r0 = 0; r0 < BN; r0 += MR)
              for (int64_t c = 0; c < dp; c += NR) {
                micro_tile(p_op + r0 * bmw, 1, bmw, dor + c * bmw, NR, depth, sc.dv.data() + r0 * dp + c, dp, true);
                micro_tile(ds_op + r0 * bmw, 1, bmw, qr + c * bmw, NR, depth, sc.dk.data() + r0 * dp + c, dp, true);
              }
          }
          if (my_dq) add_dq(sc, blk, rows, my_dq + row * dp);
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

  if (!pr.deterministic) {  // dQ = scale * (sum of the per-thread buffers)
    parallel_items(pr.threads, int64_t(pre.size()), [&](int64_t i) {
      const Item& it = pre[size_t(i)];
      const int64_t row = it.head_kv * q_total + q_off[it.segment] + it.n0;
      write_dq(it, dq_acc.data() + row * dp, nt, qsize);
    });
    return;
  }
  // Deterministic dQ: each query block sums its key blocks in key order, recomputing P and dS (two more
  // tile products per step than the shared pass, the price of a fixed reduction order).
  parallel_items(pr.threads, int64_t(pre.size()), [&](int64_t i) {
    const Item& it = pre[size_t(i)];
    const Segment& sg = pr.segments[it.segment];
    const KeyWindow win(pr, sg);
    const int64_t q0 = it.n0, rows = std::min(BM, sg.q_len - q0);
    Scratch sc = new_scratch();
    sc.dq.assign(size_t(BM * dp), 0.f);
    [[maybe_unused]] const AmxSession tiles(amx);
    for (int64_t n0 = win.lo(q0) / BN * BN; n0 < win.hi(q0 + rows - 1); n0 += BN) {
      add_dq(sc, grad_tile(sc, it.segment, it.head_kv, q0, n0).second, rows, sc.dq.data());
    }
    write_dq(it, sc.dq.data(), 1, 0);
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
