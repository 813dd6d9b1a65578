#include "attention/attention_launch.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "attention/attention_checks.h"
#include "attention/attention_cpu.h"
#include "common/tensor_checks.h"

namespace cm3leon::attention {

// Checks shared by every entry point, CPU and CUDA (attention_checks.h): matching dtypes and devices, head
// counts and dims, contiguity.
// (The KV-cache wrapper leaves these to C++ to keep decode's per-call cost low, so messages name the
// arguments as the caller knows them.)
void check_qkv(const Tensor& q, const Tensor& k, const Tensor& v, int64_t ndim, const char* kn, const char* vn) {
  TORCH_CHECK_VALUE(q.dim() == ndim && k.dim() == ndim && v.dim() == ndim, "q, ", kn, ", ", vn, " must be ",
                    ndim, "-D, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), "q, ", kn, ", ",
                   vn, " must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  TORCH_CHECK_VALUE(k.device() == q.device() && v.device() == q.device(), "q, ", kn, ", ", vn,
                    " must be on one device, got ", q.device(), ", ", k.device(), ", ", v.device());
  float_dtype(q, "q");
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), kn, " and ", vn, " must have the same shape, got ", k.sizes(),
                    " and ", v.sizes());
  const int64_t d = q.size(-1), hq = q.size(-2), hkv = k.size(-2);
  TORCH_CHECK_VALUE(k.size(-1) == d, kn, "'s head dim (", k.size(-1), ") must equal q's (", d, ")");
  TORCH_CHECK_VALUE(hkv > 0 && hq % hkv == 0, "q's head count (", hq, ") must be a multiple of ", kn, "'s (",
                    hkv, ")");
  TORCH_CHECK_VALUE(d >= 1 && d <= 256, "head dim must be in [1, 256], got ", d);
  check_contiguous(q, "q");
  check_contiguous(k, kn);
  check_contiguous(v, vn);
}

void check_softmax_scale(double softmax_scale) {
  TORCH_CHECK_VALUE(std::isfinite(float(softmax_scale)), "softmax_scale must be a finite number (as float32), got ",
                    softmax_scale);
}

void check_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out, const at::Tensor& lse,
                    at::IntArrayRef lse_shape) {
  TORCH_CHECK_VALUE(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
                    "dout and out must have q's shape ", q.sizes(), ", got ", dout.sizes(), " and ",
                    out.sizes());
  TORCH_CHECK_TYPE(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
                   "dout and out must have q's dtype");
  TORCH_CHECK_VALUE(lse.scalar_type() == at::kFloat && lse.sizes() == lse_shape, "lse must be float32 ",
                    lse_shape, " (from q's shape ", q.sizes(), "), got ", lse.scalar_type(), " ", lse.sizes());
  TORCH_CHECK_VALUE(dout.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
                    "dout, out and lse must be on q's device ", q.device(), ", got ", dout.device(), ", ",
                    out.device(), ", ", lse.device());
  check_contiguous(dout, "dout");
  check_contiguous(out, "out");
  check_contiguous(lse, "lse");
}

int64_t check_extras(const at::Tensor& q, int64_t batch, int64_t window_left, int64_t window_right,
                     double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK_VALUE(window_left >= -1, "window_left must be >= -1 (-1: unbounded), got ", window_left);
  TORCH_CHECK_VALUE(window_right >= -1, "window_right must be >= -1 (-1: unbounded), got ", window_right);
  TORCH_CHECK_VALUE(std::isfinite(float(softcap)) && softcap >= 0,
                    "softcap must be a finite number >= 0 (as float32; 0: off), got ", softcap);
  if (!alibi_slopes.has_value()) return 0;
  const at::Tensor& a = *alibi_slopes;
  const int64_t hq = q.size(-2);
  TORCH_CHECK_TYPE(a.scalar_type() == at::kFloat, "alibi_slopes must be float32, got ", a.scalar_type());
  TORCH_CHECK_VALUE((a.dim() == 1 && a.size(0) == hq) || (a.dim() == 2 && a.size(0) == batch && a.size(1) == hq),
                    "alibi_slopes must be [nheads] = [", hq, "] or [batch, nheads] = [", batch, ", ", hq,
                    "] (q's heads and batch), got ", a.sizes());
  TORCH_CHECK_VALUE(a.device() == q.device(), "alibi_slopes must be on q's device (", q.device(), "), got ",
                    a.device());
  check_contiguous(a, "alibi_slopes");
  return a.dim() == 2 ? hq : 0;
}

void check_dropout_p(double dropout_p) {
  TORCH_CHECK_VALUE(std::isfinite(dropout_p) && dropout_p >= 0 && dropout_p < 1,
                    "dropout_p must be a finite number in [0, 1), got ", dropout_p);
}

DropoutStream check_dropout(double dropout_p, const std::optional<at::Tensor>& dropout_seed, int64_t streams) {
  check_dropout_p(dropout_p);
  if (dropout_p == 0) return {};
  TORCH_CHECK_VALUE(dropout_seed.has_value(), "dropout_seed is required when dropout_p > 0 (got dropout_p = ",
                    dropout_p, ")");
  const at::Tensor& seed = *dropout_seed;
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, "dropout_seed must be int64, got ", seed.scalar_type());
  TORCH_CHECK_VALUE(seed.numel() == 1 && seed.device().is_cpu(),
                    "dropout_seed must hold one int64 on the CPU, got ", seed.sizes(), " on ", seed.device());
  TORCH_CHECK_VALUE(streams < (int64_t(1) << 32), "dropout: batch * nheads (", streams, ") must be below 2^32");
  return {uint64_t(seed.data_ptr<int64_t>()[0]), dropout_threshold(dropout_p)};
}

void check_cuda_support(const at::Tensor& q, bool deterministic_backward, double dropout_p) {
  TORCH_CHECK_NOT_IMPLEMENTED(q.size(-1) % 8 == 0, "head dim ", q.size(-1),
                              ": the CUDA attention kernels need a multiple of 8");
  check_dropout_p(dropout_p);
  TORCH_CHECK_NOT_IMPLEMENTED(dropout_p == 0, "dropout_p > 0 (got ", dropout_p,
                              ") is not implemented on CUDA: the CUDA attention kernels have no dropout");
  TORCH_CHECK_NOT_IMPLEMENTED(!deterministic_backward, "deterministic=True is not implemented on CUDA "
                              "(the backward accumulates dQ with atomics)");
}

void check_cu_seqlens(const at::Tensor& cu, const char* name, const at::Tensor& q) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, name, " must be int32, got ", cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 1, name, " must be 1-D with batch + 1 entries, got ",
                    cu.sizes());
  TORCH_CHECK_VALUE(cu.device() == q.device(), name, " is on ", cu.device(), " but q is on ", q.device());
  check_contiguous(cu, name);
}

at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
}

namespace {

// The extras become Problem fields: check_extras gives alibi_stride, check_dropout the dropout stream.
Problem make_problem(const at::Tensor& q, const at::Tensor& k, const std::vector<Segment>& segments,
                     int64_t lse_head_stride, double softmax_scale, bool causal, int64_t window_left,
                     int64_t window_right, double softcap, const std::optional<at::Tensor>& alibi_slopes,
                     int64_t alibi_stride, bool deterministic, double dropout_p,
                     const std::optional<at::Tensor>& dropout_seed) {
  // Threads from torch's setting: OpenMP's own per-thread value lags in threads torch has not synced.
  Problem p{float_dtype(q, "q"), segments.data(), int64_t(segments.size()), q.size(-2), k.size(-2),
            q.size(-1), lse_head_stride, float(softmax_scale), causal, at::get_num_threads()};
  p.window_left = window_left;
  p.window_right = window_right;
  p.softcap = float(softcap);
  p.alibi_slopes = alibi_slopes.has_value() ? alibi_slopes->data_ptr<float>() : nullptr;
  p.alibi_segment_stride = alibi_stride;
  p.deterministic = deterministic;
  p.dropout = check_dropout(dropout_p, dropout_seed, int64_t(segments.size()) * q.size(-2));
  p.dropout_scale = float(1.0 / (1.0 - dropout_p));
  return p;
}

std::vector<Segment> dense_segments(const at::Tensor& q, const at::Tensor& k) {
  const int64_t b = q.size(0), sq = q.size(1), sk = k.size(1), hq = q.size(2);
  std::vector<Segment> segments(static_cast<size_t>(b));
  for (int64_t i = 0; i < b; ++i) segments[size_t(i)] = {i * sq, sq, i * sk, sk, i * hq * sq};
  return segments;
}

// The values of cu_seqlens_<side> (side "q" or "k"), read on the host: starting at 0, non-decreasing,
// documents within max_seqlen_<side>, ending at the token count of that side's tensor.
void check_cu_seqlens_values(const at::Tensor& cu, const char* side, int64_t total, int64_t max_seqlen) {
  const int32_t* c = cu.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(c[0] == 0, "cu_seqlens_", side, "[0] must be 0, got ", c[0]);
  for (int64_t i = 1; i < cu.size(0); ++i) {
    TORCH_CHECK_VALUE(c[i] >= c[i - 1], "cu_seqlens_", side, " must be non-decreasing: cu_seqlens_", side, "[",
                      i, "] = ", c[i], " < ", c[i - 1]);
    TORCH_CHECK_VALUE(c[i] - c[i - 1] <= max_seqlen, "cu_seqlens_", side, ": document ", i - 1, " has ",
                      c[i] - c[i - 1], " tokens, more than max_seqlen_", side, " (", max_seqlen, ")");
  }
  TORCH_CHECK_VALUE(c[cu.size(0) - 1] == total, "cu_seqlens_", side, "[-1] (", c[cu.size(0) - 1],
                    ") must equal the number of packed tokens in ", side, " (", total, ")");
}

std::vector<Segment> varlen_segments(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_q,
                                     const at::Tensor& cu_k, int64_t max_q, int64_t max_k) {
  check_cu_seqlens(cu_q, "cu_seqlens_q", q);
  check_cu_seqlens(cu_k, "cu_seqlens_k", q);
  check_cu_seqlens_values(cu_q, "q", q.size(0), max_q);
  check_cu_seqlens_values(cu_k, "k", k.size(0), max_k);
  TORCH_CHECK_VALUE(cu_q.size(0) == cu_k.size(0),
                    "cu_seqlens_q and cu_seqlens_k must have the same length, got ", cu_q.size(0), " and ",
                    cu_k.size(0));
  const int32_t *cq = cu_q.data_ptr<int32_t>(), *ck = cu_k.data_ptr<int32_t>();
  std::vector<Segment> segments(size_t(cu_q.size(0) - 1));
  for (size_t i = 0; i < segments.size(); ++i)
    segments[i] = {cq[i], cq[i + 1] - cq[i], ck[i], ck[i + 1] - ck[i], cq[i]};
  return segments;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(const Problem& p, const at::Tensor& dout,
                                                            const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& out,
                                                            const at::Tensor& lse) {
  at::Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  backward_cpu(p, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
               dout.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr());
  return {dq, dk, dv};
}

}  // namespace

OutLse forward_cpu_launch(const Tensor& q, const Tensor& k, const Tensor& v, double softmax_scale,
                          bool causal, CM3LEON_ATTN_EXTRA_PARAMS) {
  check_qkv(q, k, v, 4);
  check_softmax_scale(softmax_scale);
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), "k's batch (", k.size(0), ") must equal q's (", q.size(0), ")");
  const int64_t alibi_stride = check_extras(q, q.size(0), window_left, window_right, softcap, alibi_slopes);
  const std::vector<Segment> segments = dense_segments(q, k);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  forward_cpu(make_problem(q, k, segments, q.size(1), softmax_scale, causal, window_left, window_right, softcap,
                           alibi_slopes, alibi_stride, deterministic, dropout_p, dropout_seed),
              q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr<float>());
  return {out, lse};
}

Grads backward_cpu_launch(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                          const Tensor& out, const Tensor& lse, double softmax_scale, bool causal,
                          CM3LEON_ATTN_EXTRA_PARAMS) {
  check_qkv(q, k, v, 4);
  check_softmax_scale(softmax_scale);
  // The segments index k/v by q's batch: a shorter k/v would be read (and dk/dv written) out of bounds.
  TORCH_CHECK_VALUE(k.size(0) == q.size(0), "k's batch (", k.size(0), ") must equal q's (", q.size(0), ")");
  check_backward(dout, q, out, lse, {q.size(0), q.size(2), q.size(1)});
  const int64_t alibi_stride = check_extras(q, q.size(0), window_left, window_right, softcap, alibi_slopes);
  const std::vector<Segment> segments = dense_segments(q, k);
  const Problem p = make_problem(q, k, segments, q.size(1), softmax_scale, causal, window_left, window_right,
                                 softcap, alibi_slopes, alibi_stride, deterministic, dropout_p,
                                 dropout_seed);
  return run_backward(p, dout, q, k, v, out, lse);
}

OutLse varlen_forward_cpu_launch(const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Tensor& cu_seqlens_q, const Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                 int64_t max_seqlen_k, double softmax_scale, bool causal,
                                 CM3LEON_ATTN_EXTRA_PARAMS) {
  check_qkv(q, k, v, 3);
  check_softmax_scale(softmax_scale);
  const std::vector<Segment> segments =
      varlen_segments(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const int64_t alibi_stride =
      check_extras(q, int64_t(segments.size()), window_left, window_right, softcap, alibi_slopes);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  forward_cpu(make_problem(q, k, segments, q.size(0), softmax_scale, causal, window_left, window_right, softcap,
                           alibi_slopes, alibi_stride, deterministic, dropout_p, dropout_seed),
              q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr<float>());
  return {out, lse};
}

Grads varlen_backward_cpu_launch(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Tensor& out, const Tensor& lse, const Tensor& cu_seqlens_q,
                                 const Tensor& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                 double softmax_scale, bool causal, CM3LEON_ATTN_EXTRA_PARAMS) {
  check_qkv(q, k, v, 3);
  check_softmax_scale(softmax_scale);
  check_backward(dout, q, out, lse, {q.size(1), q.size(0)});
  const std::vector<Segment> segments =
      varlen_segments(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k);
  const int64_t alibi_stride =
      check_extras(q, int64_t(segments.size()), window_left, window_right, softcap, alibi_slopes);
  const Problem p = make_problem(q, k, segments, q.size(0), softmax_scale, causal, window_left, window_right,
                                 softcap, alibi_slopes, alibi_stride, deterministic, dropout_p,
                                 dropout_seed);
  return run_backward(p, dout, q, k, v, out, lse);
}

Tensor dropout_mask_cpu_launch(const Tensor& dropout_seed, int64_t batch, int64_t nheads, int64_t seqlen_q,
                               int64_t seqlen_k, double dropout_p) {
  TORCH_CHECK_VALUE(batch >= 0 && nheads >= 0 && seqlen_q >= 0 && seqlen_k >= 0,
                    "batch, nheads, seqlen_q and seqlen_k must be >= 0, got ", batch, ", ", nheads, ", ", seqlen_q,
                    ", ", seqlen_k);
  const DropoutStream ds = check_dropout(dropout_p, dropout_seed, batch * nheads);
  at::Tensor keep = at::empty({batch, nheads, seqlen_q, seqlen_k}, dropout_seed.options().dtype(at::kBool));
  bool* dst = keep.data_ptr<bool>();
  at::parallel_for(0, batch * nheads * seqlen_q, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)  // row = (b * nheads + h) * seqlen_q + i
      dropout_row(ds, uint32_t(row / seqlen_q), uint32_t(row % seqlen_q), 0, seqlen_k,
                  [&](int64_t j, bool kept) { dst[row * seqlen_k + j] = kept; });
  });
  return keep;
}

}  // namespace cm3leon::attention
