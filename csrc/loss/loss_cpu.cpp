// Fused linear + cross-entropy, CPU body (torch-free). Tokens are processed in chunks of kChunk; for each
// chunk the logits are computed transposed, [vocab][chunk] (six vocabulary rows x sixteen tokens per
// micro-kernel call, weight rows read in place), so every per-token reduction is a vector loop across
// tokens. Vocabulary blocks are split between threads in contiguous ranges: a thread owns the rows of
// grad_weight of its blocks (no races) and keeps its own partial grad_hidden for the chunk.
#include "loss/loss_cpu.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <type_traits>
#include <vector>

#include "attention/attention_tiles.h"  // tanh_lanes, pack_rows, pack_panels, pack_strips, round_up
#include "common/parallel.h"
#include "common/scratch.h"

namespace cm3leon::loss {
CM3LEON_ISA_BEGIN
namespace {

using attention::kBf16Pairs;
using attention::kLog2e;
using attention::MR;
using attention::NR;
using attention::pack_panels;
using attention::pack_rows;
using attention::pack_strips;
using attention::round_up;

constexpr int64_t kTokenAlign = std::lcm(MR, NR);  // chunks are padded to whole micro-kernel tiles
constexpr int64_t kChunk = 192;  // tokens per chunk: the logits chunk is vocab x 192 fp32 (48 MiB at 64k)
constexpr int64_t kBlock = 96;   // vocabulary rows per block (a multiple of MR and NR)
constexpr int64_t kDepth = 256;  // depth slice of the logits matmul: a 256 x NR strip of hidden stays in L1
constexpr int64_t kRowAlign = kAmx ? 32 : MR;  // logits rows written per block: whole tiles
static_assert(kChunk % kTokenAlign == 0 && kBlock % MR == 0 && kBlock % NR == 0, "tile multiples");

// x <- cap * tanh(x / cap)
void softcap_rows(float* x, int64_t n, float cap) {
  int64_t i = 0;
#if CM3LEON_AVX2
  using W = Wide;
  const W::V inv = W::set1(1.f / cap), capv = W::set1(cap);
  for (; i + W::kLanes <= n; i += W::kLanes)
    W::store(x + i, mul(attention::tanh_lanes<W>(mul(W::load(x + i), inv)), capv));
#endif
  for (; i < n; ++i) x[i] = cap * std::tanh(x[i] / cap);
}

// One token chunk's per-token state (padded to `tp` tokens; padded tokens have zero coefficients).
struct ChunkState {
  std::vector<float> lse, target_logit, a, b, e;  // dl/dz_v = a p_v - e - b [v == y], times softcap'
  explicit ChunkState(int64_t tp) : lse(tp), target_logit(tp), a(tp), b(tp), e(tp) {}
};

template <typename T>
class Engine {
  // With bf16 pairs the gradient products take bf16 operands too: H and W as given, dl/dlogits rounded to
  // bf16 (as a bf16 autograd graph would); their packed operands then hold pairs of depth steps.
  static constexpr bool kPairs = kBf16Pairs<T>;
  using Word = std::conditional_t<kPairs, uint32_t, float>;
  static constexpr int64_t kPerWord = kPairs ? 2 : 1;

 public:
  Engine(const T* hidden, const T* weight, const int64_t* targets, const LossConfig& cfg, int threads,
         bool grads, bool full_logits)
      : h_(hidden), w_(weight), y_(targets), cfg_(cfg), grads_(grads), full_(full_logits),
        dp_(round_up(cfg.dim, NR)), nblocks_(attention::round_up(cfg.vocab, kBlock) / kBlock),
        parts_(int(std::min<int64_t>(nblocks_, usable_threads(threads)))),
        direct_w_(std::is_same_v<T, float> && cfg.dim % NR == 0),
        hpanels_(kPairs ? 0 : size_t(kChunk) * dp_), hstrips_(grads ? size_t(kChunk) * dp_ / kPerWord : 0),
        hpairs_(kPairs ? size_t(kChunk) * dp_ / 2 : 0),
        logits_(size_t(full_logits ? round_up(cfg.vocab, kRowAlign) : parts_ * kBlock) * kChunk),
        wbuf_(kPairs ? 0 : size_t(parts_) * kBlock * dp_),
        wpairs_(kPairs ? size_t(parts_) * kBlock * dp_ / 2 : 0),
        wstrips_(grads ? size_t(parts_) * kBlock * dp_ / kPerWord : 0),
        gpairs_(kPairs && grads ? size_t(parts_) * kBlock * kChunk : 0), stats_(size_t(nblocks_) * 3 * kChunk),
        dh_(grads ? size_t(parts_) * kChunk * dp_ : 0) {}

  int parts() const { return parts_; }
  int64_t nblocks() const { return nblocks_; }

  // Loads chunk [t0, t0 + nt): the packed H^T panels (and H's column strips for dW when grads are needed).
  void load_chunk(int64_t t0, int64_t nt) {
    tp_ = round_up(nt, kTokenAlign);
    const T* rows = h_ + t0 * cfg_.dim;
    if constexpr (kPairs) {  // H^T as bf16 pairs, panels of NR tokens: [tp / NR][dp / 2][NR]
      pack_pair_panels(rows, cfg_.dim, nt, cfg_.dim, NR, tp_, dp_, hpairs_.data());
    } else {
      pack_panels(rows, cfg_.dim, nt, cfg_.dim, 1.f, NR, tp_, cfg_.dim, hpanels_.data());
    }
    // H as NR-column strips, [dp / NR][tp][NR] (tokens paired with kPairs): a strip is a contiguous B operand
    // (row-major operands with 4 KiB rows, D = 1024, put every depth step in the same L1 set and ran the
    // gradient products at under half speed).
    if (grads_) {
      if constexpr (kPairs) pack_pair_strips(rows, cfg_.dim, nt, cfg_.dim, tp_, tp_, dp_, hstrips_.data());
      else pack_strips(rows, cfg_.dim, nt, cfg_.dim, tp_, tp_, dp_, hstrips_.data());
    }
    t0_ = t0;
    nt_ = nt;
  }

  // Logits of vocabulary block `blk` for the chunk (soft-capped), into the block's rows of the logits
  // buffer; returns them ([round_up(nv, kRowAlign)][tp] with row stride tp).
  float* block_logits(int part, int64_t blk) {
    const int64_t v0 = blk * kBlock, nv = std::min(kBlock, cfg_.vocab - v0);
    float* out = logits_.data() + (full_ ? v0 : part * kBlock) * tp_;
    if constexpr (kPairs) {
      pair_logits(part, v0, nv, out);
    } else {
      int64_t ld;
      const float* w = weight_block(part, v0, nv, ld);
      float_logits(w, ld, nv, out);
    }
    if (cfg_.softcap > 0.f) softcap_rows(out, nv * tp_, cfg_.softcap);
    return out;
  }

  // out = W_block H^T from fp32 (or widened) weight rows w with row stride ld.
  void float_logits(const float* w, int64_t ld, int64_t nv, float* out) {
    for (int64_t k0 = 0; k0 < cfg_.dim; k0 += kDepth) {
      const int64_t depth = std::min(kDepth, cfg_.dim - k0);
      for (int64_t tc = 0; tc < tp_; tc += NR)
        for (int64_t i = 0; i < nv; i += MR)
          micro_tile(w + i * ld + k0, 1, ld, hpanels_.data() + tc * cfg_.dim + k0 * NR, NR, depth,
                     out + i * tp_ + tc, tp_, k0 > 0);
    }
  }

  // out = W_block H^T from bf16 pairs (exact products, fp32 sums): vdpbf16ps or AMX 32 x 32 blocks.
  void pair_logits(int part, int64_t v0, int64_t nv, float* out) {
    const int64_t d2 = dp_ / 2;
    uint32_t* wp = wpairs_.data() + size_t(part) * kBlock * d2;
    pack_pair_rows(w_ + v0 * cfg_.dim, cfg_.dim, nv, cfg_.dim, round_up(nv, kRowAlign), dp_, wp);
    if constexpr (kAmx) {
      for (int64_t i = 0; i < nv; i += 32)
        for (int64_t tc = 0; tc < tp_; tc += NR)
          amx_block(wp + i * d2, d2, hpairs_.data() + tc * d2, NR, d2, out + i * tp_ + tc, tp_, false);
      return;
    }
    for (int64_t p0 = 0; p0 < d2; p0 += kDepth / 2) {
      const int64_t pairs = std::min(kDepth / 2, d2 - p0);
      for (int64_t tc = 0; tc < tp_; tc += NR)
        for (int64_t i = 0; i < nv; i += MR)
          micro_tile(wp + i * d2 + p0, 1, d2, hpairs_.data() + tc * d2 + p0 * NR, NR, pairs, out + i * tp_ + tc,
                     tp_, p0 > 0);
    }
  }

  // Per-token max, sum of exp (relative to that max) and sum of the block's logits; captures target logits.
  void block_stats(int64_t blk, const float* z, ChunkState& st) {
    const int64_t v0 = blk * kBlock, nv = std::min(kBlock, cfg_.vocab - v0);
    float* mx = stats_.data() + size_t(blk) * 3 * kChunk;
    float* se = mx + kChunk;
    float* sz = se + kChunk;
    int64_t t = 0;
#if CM3LEON_AVX2
    using W = Wide;
    for (; t + W::kLanes <= tp_; t += W::kLanes) {
      W::V m = W::load(z + t), s = W::zero(), zs = W::zero();
      for (int64_t i = 1; i < nv; ++i) m = max(m, W::load(z + i * tp_ + t));
      const W::V ml = mul(m, W::set1(kLog2e));
      for (int64_t i = 0; i < nv; ++i) {
        const W::V x = W::load(z + i * tp_ + t);
        zs = add(zs, x);
        s = add(s, exp2_neg<W>(fmsub(x, W::set1(kLog2e), ml)));
      }
      W::store(mx + t, m);
      W::store(se + t, s);
      W::store(sz + t, zs);
    }
#endif
    for (; t < tp_; ++t) {
      float m = z[t], s = 0.f, zs = 0.f;
      for (int64_t i = 1; i < nv; ++i) m = std::max(m, z[i * tp_ + t]);
      for (int64_t i = 0; i < nv; ++i) {
        zs += z[i * tp_ + t];
        s += std::exp(z[i * tp_ + t] - m);
      }
      mx[t] = m, se[t] = s, sz[t] = zs;
    }
    for (int64_t k = 0; k < nt_; ++k) {
      const int64_t y = y_[t0_ + k];
      if (y != cfg_.ignore_index && y >= v0 && y < v0 + nv) st.target_logit[k] = z[(y - v0) * tp_ + k];
    }
  }

  // Combines the block statistics into lse; returns per-token sums of logits in `sumz`. NaN/inf propagate.
  void merge_stats(ChunkState& st, std::vector<float>& sumz) const {
    for (int64_t k = 0; k < nt_; ++k) {
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t b = 0; b < nblocks_; ++b) m = std::max(m, stats_[size_t(b) * 3 * kChunk + k]);
      double s = 0.0, zs = 0.0;
      for (int64_t b = 0; b < nblocks_; ++b) {
        const float* base = stats_.data() + size_t(b) * 3 * kChunk;
        s += double(base[kChunk + k]) * std::exp(double(base[k]) - m);
        zs += base[2 * kChunk + k];
      }
      st.lse[k] = float(double(m) + std::log(s));
      sumz[k] = float(zs);
    }
  }

  // Turns a block of logits into dl/dlogits (in place), then adds its contributions to grad_weight (rows
  // owned by this part) and to this part's grad_hidden partial.
  void block_grads(int part, int64_t blk, float* z, const ChunkState& st,
                   float* grad_weight, bool first_chunk) {
    const int64_t v0 = blk * kBlock, nv = std::min(kBlock, cfg_.vocab - v0), nvp = round_up(nv, kRowAlign);
    const float cap = cfg_.softcap;
    // The target terms need the soft-cap derivative at the target logit, which the loop below overwrites.
    float target_slope[kChunk];
    for (int64_t k = 0; k < nt_; ++k) {
      const int64_t y = y_[t0_ + k];
      const float u = (y != cfg_.ignore_index && y >= v0 && y < v0 + nv && cap > 0.f) ? z[(y - v0) * tp_ + k] / cap : 0.f;
      target_slope[k] = 1.f - u * u;
    }
    for (int64_t i = 0; i < nvp; ++i) {
      float* row = z + i * tp_;
      if (i >= nv) {
        std::fill(row, row + tp_, 0.f);
        continue;
      }
      int64_t t = 0;
#if CM3LEON_AVX2
      using W = Wide;
      for (; t + W::kLanes <= tp_; t += W::kLanes) {
        const W::V x = W::load(row + t);
        const W::V p = exp2_neg<W>(mul(sub(x, W::load(st.lse.data() + t)), W::set1(kLog2e)));
        W::V g = fmsub(W::load(st.a.data() + t), p, W::load(st.e.data() + t));
        if (cap > 0.f) {
          const W::V u = mul(x, W::set1(1.f / cap));
          g = mul(g, fnmadd(u, u, W::set1(1.f)));
        }
        W::store(row + t, g);
      }
#endif
      for (; t < tp_; ++t) {
        float g = st.a[t] * std::exp(row[t] - st.lse[t]) - st.e[t];
        if (cap > 0.f) g *= 1.f - (row[t] / cap) * (row[t] / cap);
        row[t] = g;
      }
    }
    for (int64_t k = 0; k < nt_; ++k) {
      const int64_t y = y_[t0_ + k];
      if (y == cfg_.ignore_index || y < v0 || y >= v0 + nv) continue;
      z[(y - v0) * tp_ + k] -= st.b[k] * target_slope[k];
    }
    const int64_t tw = tp_ / kPerWord;  // words per row of G
    // G as the products' A operands: rows of tokens for dW, columns of vocabulary rows for dH. With pairs,
    // rounded: tokens paired ([nvp][tp / 2]) and vocabulary rows paired ([nvp / 2][tp], or [tokens][kBlock / 2]
    // for AMX).
    const Word *g_tokens, *g_vocab;
    if constexpr (kPairs) {
      uint32_t* gp = gpairs_.data() + size_t(part) * kBlock * kChunk;
      round_neighbour_pairs(z, nvp * tp_, gp);
      if constexpr (kAmx) round_col_pairs(z, tp_, nvp, nvp, round_up(nt_, 32), gp + kBlock * kChunk / 2, kBlock / 2);
      else round_row_pairs(z, tp_, nvp, tp_, gp + kBlock * kChunk / 2);
      g_tokens = gp;
      g_vocab = gp + kBlock * kChunk / 2;
    } else {
      g_tokens = g_vocab = z;
    }
    // grad_weight rows [v0, v0 + nv) (+)= G^T H over the chunk's tokens, in tiles of MR x NR (32 x 32 for AMX).
    // Row groups outermost: a group's rows are swept left to right, streams the prefetcher follows (strips
    // outermost jump 4 KiB between tiles; alone, that order ran this product ~20% slower on an AMD EPYC).
    constexpr int64_t tile_rows = kAmx && kPairs ? 32 : MR, tile_cols = kAmx && kPairs ? 32 : NR;
    for (int64_t i = 0; i < nv; i += tile_rows) {
      for (int64_t dc = 0; dc < cfg_.dim; dc += tile_cols) {
        const Word* hs = hstrips_.data() + dc * tw;  // strip dc / NR: [tp words][NR]
        const int64_t rows = std::min(tile_rows, nv - i), cols = std::min(tile_cols, cfg_.dim - dc);
        float* c = grad_weight + (v0 + i) * cfg_.dim + dc;
        const bool whole = rows == tile_rows && cols == tile_cols;  // else through a tile buffer
        float tile[tile_rows * tile_cols];
        float* out = whole ? c : tile;
        const int64_t ldc = whole ? cfg_.dim : tile_cols;
        if constexpr (kAmx && kPairs)
          amx_block(g_tokens + i * tw, tw, hs, NR, round_up(nt_, 32) / 2, out, ldc, whole && !first_chunk);
        else
          micro_tile(g_tokens + i * tw, 1, tw, hs, NR, ceil_div(nt_, kPerWord), out, ldc, whole && !first_chunk);
        if (whole) continue;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t j = 0; j < cols; ++j)
            c[r * cfg_.dim + j] = (first_chunk ? 0.f : c[r * cfg_.dim + j]) + tile[r * tile_cols + j];
      }
    }
    // This part's grad_hidden partial (+)= G W_block, W as column strips [dp / NR][nvp][NR] (vocabulary rows
    // paired with kPairs).
    float* dh = dh_.data() + size_t(part) * kChunk * dp_;
    Word* ws = wstrips_.data() + size_t(part) * kBlock * dp_ / kPerWord;
    if constexpr (kPairs) pack_pair_strips(w_ + v0 * cfg_.dim, cfg_.dim, nv, cfg_.dim, nvp, nvp, dp_, ws);
    else pack_strips(w_ + v0 * cfg_.dim, cfg_.dim, nv, cfg_.dim, nvp, nvp, dp_, ws);
    const int64_t nvw = nvp / kPerWord;  // words per strip row group
    // Token groups outermost too: a group's G columns stay in L1 while its rows of the partial stream past
    // (strips outermost: ~12% slower alone on the same host).
    if constexpr (kAmx && kPairs) {
      for (int64_t t = 0; t < nt_; t += 32)
        for (int64_t dc = 0; dc < dp_; dc += NR)
          amx_block(g_vocab + t * (kBlock / 2), kBlock / 2, ws + dc * nvw, NR, nvw, dh + t * dp_ + dc, dp_, true);
      return;
    }
    for (int64_t t = 0; t < round_up(nt_, MR); t += MR)
      for (int64_t dc = 0; dc < dp_; dc += NR)
        micro_tile(g_vocab + t, tp_, 1, ws + dc * nvw, NR, ceil_div(nv, kPerWord), dh + t * dp_ + dc, dp_, true);
  }

  void clear_grad_hidden_partials() { std::fill(dh_.data(), dh_.data() + dh_.size(), 0.f); }

  // grad_hidden rows of the chunk = sum of the parts' partials.
  void write_grad_hidden(T* grad_hidden) const {
    for (int64_t k = 0; k < nt_; ++k)
      for (int64_t d = 0; d < cfg_.dim; ++d) {
        float s = 0.f;
        for (int p = 0; p < parts_; ++p) s += dh_[(size_t(p) * kChunk + k) * dp_ + d];
        from_float(s, grad_hidden + (t0_ + k) * cfg_.dim + d);
      }
  }

  // The stored (forward) logits of a block.
  float* stored_logits(int64_t blk) { return logits_.data() + blk * kBlock * tp_; }

 private:
  // The fp32 weight rows of a block with row stride `ld`: in place for fp32 weights whose rows are whole
  // micro-kernel strips, else a zero-padded copy (also for the last block's missing rows).
  const float* weight_block(int part, int64_t v0, int64_t nv, int64_t& ld) {
    if constexpr (std::is_same_v<T, float>) {
      if (direct_w_ && v0 + round_up(nv, MR) <= cfg_.vocab) {
        ld = cfg_.dim;
        return w_ + v0 * cfg_.dim;
      }
    }
    float* buf = wbuf_.data() + size_t(part) * kBlock * dp_;
    pack_rows(w_ + v0 * cfg_.dim, cfg_.dim, nv, cfg_.dim, 1.f, round_up(nv, MR), dp_, buf);
    ld = dp_;
    return buf;
  }

  const T* h_;
  const T* w_;
  const int64_t* y_;
  LossConfig cfg_;
  bool grads_, full_;
  int64_t dp_, nblocks_;
  int parts_;
  bool direct_w_;
  ScratchBuffer<float> hpanels_;
  ScratchBuffer<Word> hstrips_;
  ScratchBuffer<uint32_t> hpairs_;  // H^T as bf16 pairs (kBf16Pairs)
  ScratchBuffer<float> logits_, wbuf_;
  ScratchBuffer<uint32_t> wpairs_;  // weight block rows as bf16 pairs (kBf16Pairs)
  ScratchBuffer<Word> wstrips_;
  ScratchBuffer<uint32_t> gpairs_;  // G rounded to bf16 pairs, two layouts per part (kPairs)
  ScratchBuffer<float> stats_, dh_;
  int64_t t0_ = 0, nt_ = 0, tp_ = 0;
};

// Runs body(part, block) over every vocabulary block, each part owning a contiguous range of blocks.
template <typename Body>
void over_blocks(int parts, int64_t nblocks, const Body& body) {
  parallel_items(parts, parts, [&](int64_t part) {
    const int64_t lo = nblocks * part / parts, hi = nblocks * (part + 1) / parts;
    for (int64_t blk = lo; blk < hi; ++blk) body(int(part), blk);
  });
}

// Checks targets and weights; returns the sum of weights over non-ignored tokens in `weight_sum`.
LossStatus check_inputs(const int64_t* targets, const float* loss_weights, const LossConfig& cfg,
                        double& weight_sum) {
  weight_sum = 0.0;
  for (int64_t t = 0; t < cfg.tokens; ++t) {
    const int64_t y = targets[t];
    if (y == cfg.ignore_index) continue;
    if (y < 0 || y >= cfg.vocab) return {LossStatus::TargetOutOfRange, t};
    const float w = loss_weights ? loss_weights[t] : 1.f;
    if (!(w >= 0.f) || !std::isfinite(w)) return {LossStatus::BadWeight, t};
    weight_sum += w;
  }
  return {};
}

// Per-token loss and gradient coefficients of a chunk; `scale[k]` multiplies token k's gradient.
// Returns false when some lse is not finite (NaN/inf in hidden or weight), with the token in `bad`.
bool finish_chunk(const LossConfig& cfg, const int64_t* targets, const float* loss_weights, int64_t t0,
                  int64_t nt, const std::vector<float>& sumz, const float* scale, ChunkState& st, float* loss,
                  int64_t& bad) {
  const float eps = cfg.label_smoothing, zl = cfg.z_loss;
  std::fill(st.a.begin(), st.a.end(), 0.f);
  std::fill(st.b.begin(), st.b.end(), 0.f);
  std::fill(st.e.begin(), st.e.end(), 0.f);
  for (int64_t k = nt; k < int64_t(st.lse.size()); ++k) st.lse[k] = 0.f;
  for (int64_t k = 0; k < nt; ++k) {
    const float lse = st.lse[k];
    if (!std::isfinite(lse) || !std::isfinite(sumz[k])) {
      bad = t0 + k;
      return false;
    }
    const int64_t y = targets[t0 + k];
    if (y == cfg.ignore_index) {
      if (loss) loss[k] = 0.f;
      continue;
    }
    const float w = loss_weights ? loss_weights[t0 + k] : 1.f;
    const double l = (1.0 - eps) * (double(lse) - st.target_logit[k]) +
                     eps * (double(lse) - double(sumz[k]) / double(cfg.vocab)) + double(zl) * lse * lse;
    if (loss) loss[k] = float(w * l);
    const float c = scale ? scale[k] * w : 0.f;
    st.a[k] = c * (1.f + 2.f * zl * lse);
    st.b[k] = c * (1.f - eps);
    st.e[k] = c * eps / float(cfg.vocab);
  }
  return true;
}

// The shared chunk loop. mode grads_in_forward: lse pass, then gradients from the stored logits.
// Backward (lse given): one pass per chunk. Forward without grads: lse pass only.
template <typename T>
LossStatus run(const T* hidden, const T* weight, const int64_t* targets, const float* loss_weights,
               const LossConfig& cfg, const float* lse_in, const float* grad_loss, Reduction reduction,
               float* loss, float* lse_out, T* grad_hidden, float* grad_weight, int threads) {
  double weight_sum = 0.0;
  LossStatus status = check_inputs(targets, loss_weights, cfg, weight_sum);
  if (status.kind != LossStatus::Ok) return status;
  const bool grads = grad_weight != nullptr;  // (grad_hidden is null when there are no tokens)
  const bool forward = lse_in == nullptr;
  if (grads && cfg.tokens == 0) {
    std::fill(grad_weight, grad_weight + cfg.vocab * cfg.dim, 0.f);
  }
  Engine<T> eng(hidden, weight, targets, cfg, threads, grads, /*full_logits=*/forward && grads);
  ChunkState st(kChunk);
  std::vector<float> sumz(kChunk), scale(kChunk), token_loss(kChunk);
  double total = 0.0;
  const float mean_scale = reduction == Reduction::Mean ? (weight_sum > 0 ? float(1.0 / weight_sum) : 0.f) : 1.f;
  for (int64_t t0 = 0; t0 < cfg.tokens; t0 += kChunk) {
    const int64_t nt = std::min(kChunk, cfg.tokens - t0);
    eng.load_chunk(t0, nt);
    if (forward) {
      over_blocks(eng.parts(), eng.nblocks(), [&](int part, int64_t blk) {
        eng.block_stats(blk, eng.block_logits(part, blk), st);
      });
      eng.merge_stats(st, sumz);
      for (int64_t k = 0; k < nt; ++k) scale[k] = mean_scale;
    } else {
      // lse is known: only the target logit and the logit sum are missing for the loss, and the gradient
      // does not need them (only lse), so they are not computed.
      for (int64_t k = 0; k < nt; ++k) {
        st.lse[k] = lse_in[t0 + k];
        st.target_logit[k] = 0.f;
        sumz[k] = 0.f;
        scale[k] = grad_loss[t0 + k];
      }
    }
    int64_t bad = -1;
    if (!finish_chunk(cfg, targets, loss_weights, t0, nt, sumz, grads ? scale.data() : nullptr, st,
                      forward ? token_loss.data() : nullptr, bad))
      return {LossStatus::NonFinite, bad};
    if (forward) {
      for (int64_t k = 0; k < nt; ++k) {
        lse_out[t0 + k] = st.lse[k];
        if (reduction == Reduction::None) loss[t0 + k] = token_loss[k];
        else total += token_loss[k];
      }
    }
    if (!grads) continue;
    eng.clear_grad_hidden_partials();
    over_blocks(eng.parts(), eng.nblocks(), [&](int part, int64_t blk) {
      float* z = forward ? eng.stored_logits(blk) : eng.block_logits(part, blk);
      eng.block_grads(part, blk, z, st, grad_weight, t0 == 0);
    });
    eng.write_grad_hidden(grad_hidden);
  }
  if (forward && reduction != Reduction::None) loss[0] = float(reduction == Reduction::Mean ? total * mean_scale : total);
  return {};
}

}  // namespace

CM3LEON_ISA_END

template <>
LossStatus forward_kernel<kIsa>(DType dtype, const void* hidden, const void* weight, const int64_t* targets,
                                const float* loss_weights, const LossConfig& cfg, Reduction reduction, float* loss,
                                float* lse, void* grad_hidden, float* grad_weight, int threads) {
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    return run(static_cast<const T*>(hidden), static_cast<const T*>(weight), targets, loss_weights, cfg, nullptr,
               nullptr, reduction, loss, lse, static_cast<T*>(grad_hidden), grad_weight, threads);
  });
}

template <>
LossStatus backward_kernel<kIsa>(DType dtype, const void* hidden, const void* weight, const int64_t* targets,
                                 const float* loss_weights, const LossConfig& cfg, const float* lse,
                                 const float* grad_loss, void* grad_hidden, float* grad_weight, int threads) {
  return dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    return run(static_cast<const T*>(hidden), static_cast<const T*>(weight), targets, loss_weights, cfg, lse,
               grad_loss, Reduction::None, nullptr, nullptr, static_cast<T*>(grad_hidden), grad_weight, threads);
  });
}

}  // namespace cm3leon::loss
