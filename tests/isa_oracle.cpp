// Torch-free check of the CPU kernel bodies of every compiled instruction-set level against a float64 oracle,
// on random problems: attention forward (tiled and decode, dense, varlen, GQA, windows, softcap, ALiBi),
// paged decode, attention backward, the fused linear + cross-entropy forward and backward, and the VQ
// nearest-code search; and, bit for bit, the bf16 rounding helpers of the pair paths (tests/isa_rounding.cpp).
//
// Built by tests/test_isa_oracle.py from the kernel sources at each level with that level's flags, as a static
// program, so it also runs under a CPU emulator (an AVX-512 body can then be checked on a host without
// AVX-512). Usage: isa_oracle SEED CASES LEVEL...  (levels by number: 0 baseline, 1 avx2, 2 avx512,
// 3 avx512_bf16, 4 amx_bf16; a family without a body at a level runs its highest one below, as the dispatch does).
// Each level's largest error against the oracle must be at most twice the baseline body's (a plain fp32
// implementation, the "same precision" yardstick) plus a small floor; outputs are poisoned with NaN first so an
// unwritten element fails. Prints one line per case and check; exits 1 if any check fails.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "attention/attention_cpu.h"
#include "attention/attention_decode.h"
#include "loss/loss_cpu.h"
#include "vq/vq_cpu.h"

using namespace cm3leon;
namespace att = cm3leon::attention;

namespace cm3leon {
template <Isa I>
int64_t bf16_rounding_mismatches(uint64_t seed, int64_t& checked);  // tests/isa_rounding.cpp
}

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
std::mt19937_64 rng;

double uniform(double a, double b) { return std::uniform_real_distribution<double>(a, b)(rng); }
int64_t pick(int64_t a, int64_t b) { return std::uniform_int_distribution<int64_t>(a, b)(rng); }  // [a, b]

// A tensor of any kernel dtype, kept beside its exact float64 values (the rounded inputs).
struct Buffer {
  DType dtype;
  std::vector<uint8_t> bytes;
  size_t n;
  Buffer(DType t, size_t count) : dtype(t), bytes(count * (t == DType::Float32 ? 4 : 2)), n(count) {}
  void* data() { return bytes.data(); }
  const void* data() const { return bytes.data(); }
  void set(size_t i, double x) {
    dispatch_float(dtype, [&](auto tag) { from_float(float(x), reinterpret_cast<decltype(tag)*>(bytes.data()) + i); });
  }
  double get(size_t i) const {
    return dispatch_float(dtype, [&](auto tag) {
      return double(to_float(reinterpret_cast<const decltype(tag)*>(bytes.data())[i]));
    });
  }
  void poison() {
    for (size_t i = 0; i < n; ++i) set(i, std::numeric_limits<double>::quiet_NaN());
  }
};

Buffer random_buffer(DType t, size_t n, double scale) {
  Buffer b(t, n);
  for (size_t i = 0; i < n; ++i) b.set(i, uniform(-scale, scale));
  return b;
}

// Largest |got - want| (infinite when got is NaN where want is not, or when infinities differ).
double max_error(const std::function<double(size_t)>& got, const std::vector<double>& want) {
  double err = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = got(i), w = want[i];
    if (std::isinf(w) || std::isinf(g)) {
      if (g != w) return kInf;
      continue;
    }
    if (std::isnan(g) != std::isnan(w)) return kInf;
    if (!std::isnan(w)) err = std::max(err, std::fabs(g - w));
  }
  return err;
}

double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v)
    if (std::isfinite(x)) m = std::max(m, std::fabs(x));
  return m;
}

// The error floor of a dtype's outputs (relative to the largest reference magnitude).
double floor_of(DType t) { return t == DType::Float32 ? 2e-6 : t == DType::BFloat16 ? 8e-3 : 1e-3; }

int failures = 0;

// errors[level] for each tested level; errors[0] is the baseline's yardstick.
void judge(const std::string& what, const std::vector<int>& levels, const std::vector<double>& errors,
           double magnitude, DType t) {
  const double limit = 2 * errors[0] + floor_of(t) * std::max(1.0, magnitude);
  for (size_t i = 0; i < levels.size(); ++i) {
    const bool ok = errors[i] <= limit;
    if (!ok) ++failures;
    std::printf("%s level %d: error %.3g (limit %.3g) %s\n", what.c_str(), levels[i], errors[i], limit,
                ok ? "ok" : "FAIL");
  }
}

const char* dtype_name(DType t) { return t == DType::Float32 ? "fp32" : t == DType::BFloat16 ? "bf16" : "fp16"; }

// ---- attention -------------------------------------------------------------------------------------------

struct AttentionCase {
  att::Problem p{};
  std::vector<att::Segment> segments;
  std::vector<float> slopes;
  int64_t total_q = 0, total_k = 0;
  std::string name;
};

AttentionCase random_attention(DType t, bool decode) {
  AttentionCase c;
  const int64_t hkv = pick(1, 3), group = decode ? pick(1, 4) : pick(1, 3), d = pick(0, 3) ? pick(1, 256) : 64;
  const int64_t nseg = pick(1, 3);
  for (int64_t s = 0; s < nseg; ++s) {
    const int64_t q_len = decode ? pick(1, 8 / group) : pick(1, 150);
    const int64_t k_len = decode ? pick(1, 700) : std::max<int64_t>(1, q_len + pick(-20, 120));
    c.segments.push_back({c.total_q, q_len, c.total_k, k_len, c.total_q});
    c.total_q += q_len, c.total_k += k_len;
  }
  att::Problem& p = c.p;
  p.dtype = t;
  p.num_segments = nseg;
  p.heads_q = hkv * group, p.heads_kv = hkv, p.head_dim = d;
  p.lse_head_stride = c.total_q;
  p.scale = float(1 / std::sqrt(double(d)));
  p.causal = pick(0, 1);
  p.threads = 1;
  if (pick(0, 2) == 0) p.window_left = pick(0, 60), p.window_right = pick(-1, 30);
  if (pick(0, 2) == 0) p.softcap = float(uniform(2, 20));
  if (pick(0, 2) == 0) {
    for (int64_t h = 0; h < p.heads_q; ++h) c.slopes.push_back(float(uniform(0, 0.5)));
    p.alibi_slopes = c.slopes.data();
  }
  char buf[200];
  std::snprintf(buf, sizeof buf, "%s segs %lld hq %lld hkv %lld d %lld causal %d win (%lld,%lld) cap %.1f alibi %d",
                dtype_name(t), (long long)nseg, (long long)p.heads_q, (long long)hkv, (long long)d, int(p.causal),
                (long long)p.window_left, (long long)p.window_right, p.softcap, int(!c.slopes.empty()));
  c.name = buf;
  return c;
}

// Visible keys [lo, hi) of query i of a segment, as the kernels define them.
void visible(const att::Problem& p, const att::Segment& s, int64_t i, int64_t& lo, int64_t& hi) {
  const int64_t diag = i + s.k_len - s.q_len, right = p.causal ? 0 : p.window_right;
  lo = p.window_left < 0 ? 0 : std::clamp<int64_t>(diag - p.window_left, 0, s.k_len);
  hi = right < 0 ? s.k_len : std::clamp<int64_t>(diag + right + 1, 0, s.k_len);
}

// Scores of query i against its visible keys, with softcap and ALiBi; t = tanh of the capped argument.
void scores(const AttentionCase& c, const Buffer& q, const Buffer& k, int64_t si, int64_t h, int64_t i, int64_t lo,
            int64_t hi, std::vector<double>& s, std::vector<double>& t) {
  const att::Problem& p = c.p;
  const att::Segment& sg = c.segments[size_t(si)];
  const int64_t d = p.head_dim, hk = h / (p.heads_q / p.heads_kv);
  s.assign(size_t(hi - lo), 0), t.assign(size_t(hi - lo), 0);
  for (int64_t j = lo; j < hi; ++j) {
    double x = 0;
    for (int64_t e = 0; e < d; ++e)
      x += q.get(size_t(((sg.q_start + i) * p.heads_q + h) * d + e)) *
           k.get(size_t(((sg.k_start + j) * p.heads_kv + hk) * d + e));
    x *= p.scale;
    if (p.softcap > 0) {
      t[size_t(j - lo)] = std::tanh(x / p.softcap);
      x = p.softcap * t[size_t(j - lo)];
    }
    if (p.alibi_slopes) x -= p.alibi_slopes[h] * std::fabs(double(i + sg.k_len - sg.q_len - j));
    s[size_t(j - lo)] = x;
  }
}

// Calls row(segment, head, query, lo, hi, scores, tanh) for every query row that sees a key.
template <typename Row>
void for_each_row(const AttentionCase& c, const Buffer& q, const Buffer& k, Row&& row) {
  std::vector<double> s, t;
  for (int64_t si = 0; si < c.p.num_segments; ++si) {
    const att::Segment& sg = c.segments[size_t(si)];
    for (int64_t h = 0; h < c.p.heads_q; ++h)
      for (int64_t i = 0; i < sg.q_len; ++i) {
        int64_t lo, hi;
        visible(c.p, sg, i, lo, hi);
        if (hi <= lo) continue;
        scores(c, q, k, si, h, i, lo, hi, s, t);
        row(sg, h, i, lo, hi, s, t);
      }
  }
}

void reference_forward(const AttentionCase& c, const Buffer& q, const Buffer& k, const Buffer& v,
                       std::vector<double>& out, std::vector<double>& lse) {
  const att::Problem& p = c.p;
  const int64_t d = p.head_dim;
  out.assign(size_t(c.total_q * p.heads_q * d), 0);
  lse.assign(size_t(c.total_q * p.heads_q), -kInf);
  for_each_row(c, q, k, [&](const att::Segment& sg, int64_t h, int64_t i, int64_t lo, int64_t hi,
                            const std::vector<double>& s, const std::vector<double>&) {
    double m = -kInf, l = 0;
    for (double x : s) m = std::max(m, x);
    for (double x : s) l += std::exp(x - m);
    lse[size_t(h * p.lse_head_stride + sg.lse_start + i)] = m + std::log(l);
    double* o = &out[size_t(((sg.q_start + i) * p.heads_q + h) * d)];
    for (int64_t j = lo; j < hi; ++j) {
      const double w = std::exp(s[size_t(j - lo)] - m) / l;
      for (int64_t e = 0; e < d; ++e)
        o[e] += w * v.get(size_t(((sg.k_start + j) * p.heads_kv + h / (p.heads_q / p.heads_kv)) * d + e));
    }
  });
}

// Gradients given dout, the (rounded) forward output and the exact lse.
void reference_backward(const AttentionCase& c, const Buffer& q, const Buffer& k, const Buffer& v, const Buffer& out,
                        const std::vector<double>& lse, const Buffer& dout, std::vector<double>& dq,
                        std::vector<double>& dk, std::vector<double>& dv) {
  const att::Problem& p = c.p;
  const int64_t d = p.head_dim, group = p.heads_q / p.heads_kv;
  dq.assign(size_t(c.total_q * p.heads_q * d), 0);
  dk.assign(size_t(c.total_k * p.heads_kv * d), 0);
  dv.assign(dk.size(), 0);
  for_each_row(c, q, k, [&](const att::Segment& sg, int64_t h, int64_t i, int64_t lo, int64_t hi,
                            const std::vector<double>& s, const std::vector<double>& t) {
    const size_t qrow = size_t(((sg.q_start + i) * p.heads_q + h) * d);
    const double row_lse = lse[size_t(h * p.lse_head_stride + sg.lse_start + i)];
    double dsum = 0;
    for (int64_t e = 0; e < d; ++e) dsum += dout.get(qrow + size_t(e)) * out.get(qrow + size_t(e));
    for (int64_t j = lo; j < hi; ++j) {
      const size_t krow = size_t(((sg.k_start + j) * p.heads_kv + h / group) * d);
      const double prob = std::exp(s[size_t(j - lo)] - row_lse);
      double dp = 0;
      for (int64_t e = 0; e < d; ++e) dp += dout.get(qrow + size_t(e)) * v.get(krow + size_t(e));
      double ds = prob * (dp - dsum) * p.scale;
      if (p.softcap > 0) ds *= 1 - t[size_t(j - lo)] * t[size_t(j - lo)];
      for (int64_t e = 0; e < d; ++e) {
        dq[qrow + size_t(e)] += ds * k.get(krow + size_t(e));
        dk[krow + size_t(e)] += ds * q.get(qrow + size_t(e));
        dv[krow + size_t(e)] += prob * dout.get(qrow + size_t(e));
      }
    }
  });
}

// The kernel of `level` (0, 1 or 2) through a compile-time level.
template <typename F>
void at_level(int level, F&& f) {
  switch (level) {
    case 0: return f(std::integral_constant<Isa, Isa::Baseline>{});
    case 1: return f(std::integral_constant<Isa, Isa::Avx2>{});
    case 2: return f(std::integral_constant<Isa, Isa::Avx512>{});
    case 3: return f(std::integral_constant<Isa, Isa::Avx512Bf16>{});
    case 4: return f(std::integral_constant<Isa, Isa::AmxBf16>{});
  }
  std::fprintf(stderr, "unknown level %d\n", level);
  std::exit(2);
}

void check_attention(DType t, bool decode, const std::vector<int>& levels) {
  AttentionCase c = random_attention(t, decode);
  const att::Problem& p = c.p;
  const size_t nq = size_t(c.total_q * p.heads_q * p.head_dim), nk = size_t(c.total_k * p.heads_kv * p.head_dim);
  const Buffer q = random_buffer(t, nq, 2), k = random_buffer(t, nk, 2), v = random_buffer(t, nk, 1);
  c.p.segments = c.segments.data();
  std::vector<double> ref_out, ref_lse;
  reference_forward(c, q, k, v, ref_out, ref_lse);
  std::vector<double> err_out, err_lse;
  std::vector<int> all = {0};
  all.insert(all.end(), levels.begin(), levels.end());
  for (int level : all) {
    Buffer out(t, nq);
    out.poison();
    std::vector<float> lse(ref_lse.size(), std::numeric_limits<float>::quiet_NaN());
    at_level(level, [&](auto isa) {
      att::forward_kernel<decltype(isa)::value>(c.p, q.data(), k.data(), v.data(), out.data(), lse.data());
    });
    err_out.push_back(max_error([&](size_t i) { return out.get(i); }, ref_out));
    err_lse.push_back(max_error([&](size_t i) { return double(lse[i]); }, ref_lse));
  }
  const std::string head = std::string(decode ? "decode " : "forward ") + c.name;
  judge(head + " | out", all, err_out, max_abs(ref_out), t);
  judge(head + " | lse", all, err_lse, max_abs(ref_lse), DType::Float32);
  if (decode) return;

  // Backward from the rounded reference output and the exact lse.
  Buffer out(t, nq);
  for (size_t i = 0; i < nq; ++i) out.set(i, ref_out[i]);
  std::vector<float> lse32(ref_lse.begin(), ref_lse.end());
  const Buffer dout = random_buffer(t, nq, 1);
  std::vector<double> ref_dq, ref_dk, ref_dv;
  reference_backward(c, q, k, v, out, ref_lse, dout, ref_dq, ref_dk, ref_dv);
  std::vector<double> err_dq, err_dk, err_dv;
  for (int level : all) {
    Buffer dq(t, nq), dk(t, nk), dv(t, nk);
    dq.poison(), dk.poison(), dv.poison();
    at_level(level, [&](auto isa) {
      att::backward_kernel<decltype(isa)::value>(c.p, q.data(), k.data(), v.data(), out.data(), lse32.data(),
                                                 dout.data(), dq.data(), dk.data(), dv.data());
    });
    err_dq.push_back(max_error([&](size_t i) { return dq.get(i); }, ref_dq));
    err_dk.push_back(max_error([&](size_t i) { return dk.get(i); }, ref_dk));
    err_dv.push_back(max_error([&](size_t i) { return dv.get(i); }, ref_dv));
  }
  judge("backward " + c.name + " | dq", all, err_dq, max_abs(ref_dq), t);
  judge("backward " + c.name + " | dk", all, err_dk, max_abs(ref_dk), t);
  judge("backward " + c.name + " | dv", all, err_dv, max_abs(ref_dv), t);
}

// Decode from a paged cache: the keys of the contiguous case scattered over shuffled pages.
void check_paged_decode(DType t, const std::vector<int>& levels) {
  AttentionCase c = random_attention(t, true);
  c.p.segments = c.segments.data();
  const att::Problem& p = c.p;
  const int64_t page = 16 * pick(1, 4), row = p.heads_kv * p.head_dim;
  int64_t max_pages = 0;
  for (const att::Segment& s : c.segments) max_pages = std::max(max_pages, (s.k_len + page - 1) / page);
  const int64_t blocks = max_pages * p.num_segments;
  std::vector<int32_t> table(static_cast<size_t>(blocks));
  for (int64_t b = 0; b < blocks; ++b) table[size_t(b)] = int32_t(b);
  std::shuffle(table.begin(), table.end(), rng);
  const size_t nq = size_t(c.total_q * p.heads_q * p.head_dim), nk = size_t(c.total_k * row);
  const Buffer q = random_buffer(t, nq, 2), k = random_buffer(t, nk, 2), v = random_buffer(t, nk, 1);
  Buffer kp(t, size_t(blocks * page * row)), vp(t, size_t(blocks * page * row));
  std::vector<att::Segment> paged = c.segments;
  for (int64_t s = 0; s < p.num_segments; ++s) {
    const att::Segment& sg = c.segments[size_t(s)];
    paged[size_t(s)].k_start = 0;  // logical positions from the start of the segment's table row
    for (int64_t n = 0; n < sg.k_len; ++n) {
      const int64_t slot = int64_t(table[size_t(s * max_pages + n / page)]) * page + n % page;
      for (int64_t e = 0; e < row; ++e) {
        kp.set(size_t(slot * row + e), k.get(size_t((sg.k_start + n) * row + e)));
        vp.set(size_t(slot * row + e), v.get(size_t((sg.k_start + n) * row + e)));
      }
    }
  }
  std::vector<double> ref_out, ref_lse;
  reference_forward(c, q, k, v, ref_out, ref_lse);
  att::Problem pp = c.p;
  pp.segments = paged.data();
  const att::DecodeLayout layout{table.data(), max_pages, page, pick(0, 3)};
  std::vector<double> err_out;
  std::vector<int> tested;
  for (int level : levels) {
    if (level == 0) continue;  // the baseline has no decode path
    Buffer out(t, nq);
    out.poison();
    std::vector<float> lse(ref_lse.size(), std::numeric_limits<float>::quiet_NaN());
    bool ran = false;
    at_level(level, [&](auto isa) {
      ran = att::decode_kernel<decltype(isa)::value>(pp, layout, q.data(), kp.data(), vp.data(), out.data(), lse.data());
    });
    if (!ran) {
      ++failures;
      std::printf("paged decode %s level %d: the decode path did not take it FAIL\n", c.name.c_str(), level);
      continue;
    }
    tested.push_back(level);
    err_out.push_back(std::max(max_error([&](size_t i) { return out.get(i); }, ref_out),
                               max_error([&](size_t i) { return double(lse[i]); }, ref_lse)));
  }
  if (tested.empty()) return;
  // No baseline decode: the yardstick is the rounding of the output dtype alone.
  tested.insert(tested.begin(), 0);
  err_out.insert(err_out.begin(), 0.0);
  judge("paged decode (page " + std::to_string(page) + ") " + c.name + " | out, lse", tested, err_out,
        std::max(max_abs(ref_out), max_abs(ref_lse)), t);
}

// ---- fused linear + cross-entropy ------------------------------------------------------------------------

void check_loss(DType t, const std::vector<int>& levels) {
  loss::LossConfig cfg;
  cfg.tokens = pick(1, 220), cfg.dim = pick(1, 200), cfg.vocab = pick(2, 600);
  cfg.label_smoothing = pick(0, 1) ? float(uniform(0, 0.3)) : 0.f;
  cfg.z_loss = pick(0, 1) ? float(uniform(0, 1e-2)) : 0.f;
  cfg.softcap = pick(0, 1) ? float(uniform(3, 30)) : 0.f;
  const int64_t T = cfg.tokens, D = cfg.dim, V = cfg.vocab;
  const Buffer h = random_buffer(t, size_t(T * D), 1), w = random_buffer(t, size_t(V * D), 1);
  std::vector<int64_t> y(static_cast<size_t>(T));
  for (auto& yt : y) yt = pick(0, 9) == 0 ? cfg.ignore_index : pick(0, V - 1);
  std::vector<float> weights(static_cast<size_t>(T)), grad_loss(static_cast<size_t>(T));
  for (auto& x : weights) x = float(uniform(0.5, 1.5));
  for (auto& x : grad_loss) x = float(uniform(-1, 1));

  // Oracle: per-token loss and lse, and the gradients of sum_t grad_loss_t * loss_t.
  std::vector<double> ref_loss(static_cast<size_t>(T)), ref_lse(static_cast<size_t>(T)), ref_gh(size_t(T * D), 0), ref_gw(size_t(V * D), 0);
  std::vector<double> z(static_cast<size_t>(V)), raw(static_cast<size_t>(V));
  for (int64_t i = 0; i < T; ++i) {
    double m = -kInf, zsum = 0;
    for (int64_t v = 0; v < V; ++v) {
      double x = 0;
      for (int64_t e = 0; e < D; ++e) x += h.get(size_t(i * D + e)) * w.get(size_t(v * D + e));
      raw[size_t(v)] = x;
      z[size_t(v)] = cfg.softcap > 0 ? cfg.softcap * std::tanh(x / cfg.softcap) : x;
      m = std::max(m, z[size_t(v)]);
      zsum += z[size_t(v)];
    }
    double l = 0;
    for (int64_t v = 0; v < V; ++v) l += std::exp(z[size_t(v)] - m);
    const double lse = m + std::log(l), eps = cfg.label_smoothing, zl = cfg.z_loss;
    ref_lse[size_t(i)] = lse;
    if (y[size_t(i)] == cfg.ignore_index) continue;
    const int64_t yt = y[size_t(i)];
    ref_loss[size_t(i)] = weights[size_t(i)] * ((1 - eps) * (lse - z[size_t(yt)]) + eps * (lse - zsum / V) + zl * lse * lse);
    const double g = grad_loss[size_t(i)] * weights[size_t(i)];
    for (int64_t v = 0; v < V; ++v) {
      const double prob = std::exp(z[size_t(v)] - lse);
      double dz = (1 - eps) * (prob - (v == yt)) + eps * (prob - 1.0 / V) + 2 * zl * lse * prob;
      if (cfg.softcap > 0) dz *= 1 - (z[size_t(v)] / cfg.softcap) * (z[size_t(v)] / cfg.softcap);
      dz *= g;
      for (int64_t e = 0; e < D; ++e) {
        ref_gh[size_t(i * D + e)] += dz * w.get(size_t(v * D + e));
        ref_gw[size_t(v * D + e)] += dz * h.get(size_t(i * D + e));
      }
    }
  }
  std::vector<float> lse32(ref_lse.begin(), ref_lse.end());
  std::vector<double> err_loss, err_lse, err_gh, err_gw;
  std::vector<int> all = {0};
  all.insert(all.end(), levels.begin(), levels.end());
  for (int level : all) {
    std::vector<float> lossv(size_t(T), NAN), lse(size_t(T), NAN), gw(size_t(V * D), NAN);
    Buffer gh(t, size_t(T * D));
    gh.poison();
    loss::LossStatus fs, bs;
    at_level(std::min(level, int(loss::kLossMaxIsa)), [&](auto isa) {
      constexpr Isa I = decltype(isa)::value;
      fs = loss::forward_kernel<I>(t, h.data(), w.data(), y.data(), weights.data(), cfg, loss::Reduction::None,
                                   lossv.data(), lse.data(), nullptr, nullptr, 1);
      bs = loss::backward_kernel<I>(t, h.data(), w.data(), y.data(), weights.data(), cfg, lse32.data(),
                                    grad_loss.data(), gh.data(), gw.data(), 1);
    });
    const bool ok = fs.kind == loss::LossStatus::Ok && bs.kind == loss::LossStatus::Ok;
    err_loss.push_back(ok ? max_error([&](size_t i) { return double(lossv[i]); }, ref_loss) : kInf);
    err_lse.push_back(max_error([&](size_t i) { return double(lse[i]); }, ref_lse));
    err_gh.push_back(max_error([&](size_t i) { return gh.get(i); }, ref_gh));
    err_gw.push_back(max_error([&](size_t i) { return double(gw[i]); }, ref_gw));
  }
  char buf[160];
  std::snprintf(buf, sizeof buf, "loss %s T %lld D %lld V %lld smoothing %.2f z_loss %.4f cap %.1f", dtype_name(t),
                (long long)T, (long long)D, (long long)V, cfg.label_smoothing, cfg.z_loss, cfg.softcap);
  judge(std::string(buf) + " | loss", all, err_loss, max_abs(ref_loss), DType::Float32);
  judge(std::string(buf) + " | lse", all, err_lse, max_abs(ref_lse), DType::Float32);
  judge(std::string(buf) + " | grad_hidden", all, err_gh, max_abs(ref_gh), t);
  // grad_weight is accumulated in fp32 but returned in the inputs' dtype (and bf16 paths round dl/dz to bf16).
  judge(std::string(buf) + " | grad_weight", all, err_gw, max_abs(ref_gw), t);
}

// ---- VQ nearest-code search ------------------------------------------------------------------------------

// The error of a search: the chosen code's distance above the best one (a near tie may pick either), and the
// reported distance against the chosen code's exact one.
void check_vq(DType t, const std::vector<int>& levels) {
  const int64_t n = pick(1, 300), k = pick(1, 700), d = pick(0, 2) ? pick(1, 300) : 256;
  const vq::Metric metric = pick(0, 2) ? vq::Metric::L2 : vq::Metric::Cosine;
  const Buffer z = random_buffer(t, size_t(n * d), 1), codes = random_buffer(t, size_t(k * d), 1);
  std::vector<double> exact(size_t(n * k)), best(size_t(n), kInf);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < k; ++j) {
      double dot = 0, zz = 0, cc = 0;
      for (int64_t e = 0; e < d; ++e) {
        const double a = z.get(size_t(i * d + e)), b = codes.get(size_t(j * d + e));
        dot += a * b, zz += a * a, cc += b * b;
      }
      const double dist = metric == vq::Metric::L2 ? zz - 2 * dot + cc
                                                   : 1 - (zz > 0 && cc > 0 ? dot / std::sqrt(zz * cc) : 0);
      exact[size_t(i * k + j)] = dist;
      best[size_t(i)] = std::min(best[size_t(i)], dist);
    }
  std::vector<double> errors, magnitude(best);
  std::vector<int> all = {0};
  all.insert(all.end(), levels.begin(), levels.end());
  for (int level : all) {
    std::vector<int64_t> index(size_t(n), -7);
    std::vector<float> dist(size_t(n), NAN);
    int64_t bad = 0;
    at_level(level, [&](auto isa) {
      bad = vq::nearest_kernel<decltype(isa)::value>(t, z.data(), codes.data(), n, k, d, metric, index.data(),
                                                     dist.data(), 1);
    });
    double err = bad ? kInf : 0;
    for (int64_t i = 0; i < n; ++i) {
      const int64_t j = index[size_t(i)];
      if (j < 0 || j >= k || std::isnan(dist[size_t(i)])) {
        err = kInf;
        break;
      }
      const double chosen = exact[size_t(i * k + j)];
      err = std::max({err, chosen - best[size_t(i)], std::fabs(double(dist[size_t(i)]) - chosen)});
    }
    errors.push_back(err);
  }
  char buf[120];
  std::snprintf(buf, sizeof buf, "vq_nearest %s %s n %lld k %lld d %lld", dtype_name(t),
                metric == vq::Metric::L2 ? "l2" : "cosine", (long long)n, (long long)k, (long long)d);
  // Distances are fp32 whatever the input dtype.
  judge(std::string(buf) + " | distance", all, errors, max_abs(magnitude), DType::Float32);
}

// ---- bf16 rounding ----------------------------------------------------------------------------------------

void check_rounding(uint64_t seed, const std::vector<int>& levels) {
  for (int level : levels) {
    int64_t bad = 0, checked = 0;
    at_level(level, [&](auto isa) { bad = bf16_rounding_mismatches<decltype(isa)::value>(seed, checked); });
    const bool ok = bad == 0 && checked > 0;
    if (!ok) ++failures;
    std::printf("bf16 rounding level %d: %lld of %lld words differ from bf16_pair %s\n", level, (long long)bad,
                (long long)checked, ok ? "ok" : "FAIL");
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s SEED CASES LEVEL... (levels: 1 avx2 ... 4 amx_bf16)\n", argv[0]);
    return 2;
  }
  const uint64_t seed = std::strtoull(argv[1], nullptr, 10);
  rng.seed(seed);
  const int cases = std::atoi(argv[2]);
  std::vector<int> levels;
  for (int i = 3; i < argc; ++i) levels.push_back(std::atoi(argv[i]));
  const DType dtypes[] = {DType::Float32, DType::BFloat16, DType::Float16};
  for (int n = 0; n < cases; ++n) {
    const DType t = dtypes[n % 3];
    check_attention(t, false, levels);
    check_attention(t, true, levels);
    check_paged_decode(t, levels);
    check_loss(t, levels);
    check_vq(t, levels);
  }
  check_rounding(seed, levels);
  std::printf("%d failed checks\n", failures);
  return failures ? 1 : 0;
}
