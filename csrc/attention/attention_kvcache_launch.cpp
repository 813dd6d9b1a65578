// The KV-cache op's argument checks (CPU and CUDA) and its CPU launcher: append the new k/v (rotated) into a
// contiguous or paged cache, rotate q, then attend through the decode path or the tiled forward.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "attention/attention_checks.h"
#include "attention/attention_cpu.h"
#include "attention/attention_decode.h"
#include "attention/attention_kvcache_checks.h"
#include "attention/attention_launch.h"
#include "attention/attention_rotary.h"
#include "common/tensor_checks.h"

namespace cm3leon::attention {
namespace {

// An int32 [batch] (or [batch, n] with n = -1 for any) tensor on `device`, contiguous; batch is q's.
void check_int32(const at::Tensor& t, const char* name, at::IntArrayRef shape, const at::Device& device) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  bool ok = t.dim() == int64_t(shape.size());
  for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || t.size(int64_t(i)) == shape[i];
  TORCH_CHECK_VALUE(ok, name, " must have shape ", shape, " (q's batch first; -1: any), got ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == device, name, " must be on the cache's device (", device, "), got ",
                    t.device());
  check_contiguous(t, name);
}

}  // namespace

KvcacheShape check_kvcache(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const std::optional<at::Tensor>& k, const std::optional<at::Tensor>& v,
                           const std::optional<at::Tensor>& cache_seqlens, double softmax_scale,
                           const KvcacheOptions& o) {
  check_qkv(q, k_cache, v_cache, 4, "k_cache", "v_cache");
  check_softmax_scale(softmax_scale);
  const int64_t b = q.size(0), hkv = k_cache.size(2), d = q.size(3);
  const at::Device dev = k_cache.device();
  KvcacheShape s;
  if (o.block_table.has_value()) {
    check_int32(*o.block_table, "block_table", {b, -1}, dev);
    TORCH_CHECK_VALUE(!o.cache_batch_idx.has_value(),
                      "cache_batch_idx must be None with a block_table (the table already maps rows to blocks)");
    TORCH_CHECK_VALUE(k_cache.size(0) >= 1 && k_cache.size(1) >= 1,
                      "a paged k_cache must be [num_blocks >= 1, page_block_size >= 1, heads_kv, head_dim], got ",
                      k_cache.sizes());
    s.page = k_cache.size(1);
    s.capacity = o.block_table->size(1) * s.page;
  } else {
    s.capacity = k_cache.size(1);
    if (o.cache_batch_idx.has_value())
      check_int32(*o.cache_batch_idx, "cache_batch_idx", {b}, dev);
    else
      TORCH_CHECK_VALUE(k_cache.size(0) == b, "k_cache's batch (", k_cache.size(0), ") must equal q's (", b,
                        ") unless cache_batch_idx or block_table is given");
  }
  TORCH_CHECK_VALUE(k.has_value() == v.has_value(), "k and v must be given together");
  if (k.has_value()) {
    TORCH_CHECK_VALUE(k->dim() == 4 && k->size(0) == b && k->size(2) == hkv && k->size(3) == d &&
                          v->sizes() == k->sizes(),
                      "k and v must be [batch, new_tokens, heads_kv, head_dim] matching the cache, got ",
                      k->sizes(), " and ", v->sizes());
    TORCH_CHECK_TYPE(k->scalar_type() == q.scalar_type() && v->scalar_type() == q.scalar_type(),
                     "k and v must have the cache's dtype, got ", k->scalar_type(), " and ", v->scalar_type());
    TORCH_CHECK_VALUE(k->device() == q.device() && v->device() == q.device(), "k and v must be on q's device");
    check_contiguous(*k, "k");
    check_contiguous(*v, "v");
    s.new_len = k->size(1);
  }
  if (cache_seqlens.has_value()) check_int32(*cache_seqlens, "cache_seqlens", {b}, dev);
  if (o.cache_leftpad.has_value()) check_int32(*o.cache_leftpad, "cache_leftpad", {b}, dev);
  TORCH_CHECK_VALUE(o.rotary_cos.has_value() == o.rotary_sin.has_value(),
                    "rotary_cos and rotary_sin must be given together");
  if (o.rotary_cos.has_value()) {
    const at::Tensor &cos = *o.rotary_cos, &sin = *o.rotary_sin;
    TORCH_CHECK_VALUE(k.has_value(), "rotary_cos/rotary_sin need the new k and v (they rotate k while appending)");
    TORCH_CHECK_TYPE(cos.scalar_type() == q.scalar_type() && sin.scalar_type() == q.scalar_type(),
                     "rotary_cos and rotary_sin must have q's dtype (", q.scalar_type(), "), got ",
                     cos.scalar_type(), " and ", sin.scalar_type());
    TORCH_CHECK_VALUE(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(1) >= 1 && 2 * cos.size(1) <= d,
                      "rotary_cos and rotary_sin must both be [seqlen_ro, rotary_dim / 2] with 2 <= rotary_dim <= "
                      "head_dim (", d, "), got ", cos.sizes(), " and ", sin.sizes());
    TORCH_CHECK_VALUE(cos.device() == q.device() && sin.device() == q.device(),
                      "rotary_cos and rotary_sin must be on q's device (", q.device(), ")");
    check_contiguous(cos, "rotary_cos");
    check_contiguous(sin, "rotary_sin");
    s.rotary_dim = 2 * cos.size(1);
  }
  s.alibi_stride = check_extras(q, b, o.window_left, o.window_right, o.softcap, o.alibi_slopes);
  TORCH_CHECK_VALUE(o.num_splits >= 0, "num_splits must be >= 0 (0: automatic), got ", o.num_splits);
  return s;
}

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Where row b of the batch lives in the cache and which of its positions are valid.
struct CacheRow {
  int64_t first_token;  // contiguous cache: token index of position 0 (cache row * capacity); paged: unused
  int64_t seqlen;       // cache_seqlens[b]: the append starts here
  int64_t leftpad;      // keys before this position are invisible
};

// Reads and range-checks the int32 arguments (cache_seqlens, cache_leftpad, cache_batch_idx, block_table,
// and the rotary table length): after this, every position the op touches is inside the cache.
std::vector<CacheRow> cache_rows(const at::Tensor& q, const at::Tensor& k_cache,
                                 const std::optional<at::Tensor>& cache_seqlens, int64_t cache_seqlen,
                                 bool causal, const KvcacheOptions& o, const KvcacheShape& s) {
  const int64_t b = q.size(0), sq = q.size(1), n = s.new_len;
  const int32_t* seqlens = cache_seqlens.has_value() ? cache_seqlens->data_ptr<int32_t>() : nullptr;
  const int32_t* leftpad = o.cache_leftpad.has_value() ? o.cache_leftpad->data_ptr<int32_t>() : nullptr;
  const int32_t* idx = o.cache_batch_idx.has_value() ? o.cache_batch_idx->data_ptr<int32_t>() : nullptr;
  std::vector<CacheRow> rows(static_cast<size_t>(b));
  for (int64_t i = 0; i < b; ++i) {
    CacheRow& r = rows[size_t(i)];
    r.seqlen = seqlens ? seqlens[i] : cache_seqlen;
    TORCH_CHECK_VALUE(r.seqlen >= 0, "cache_seqlens[", i, "] = ", r.seqlen, " must be >= 0");
    // A paged row too short is a RuntimeError naming block_table, as FlashAttention raises (and tests) it.
    TORCH_CHECK(s.page == 0 || r.seqlen + n <= s.capacity, "block_table: row ", i, " has ", s.capacity / s.page,
                " blocks of ", s.page, " positions, but cache_seqlens[", i, "] = ", r.seqlen, " plus ", n,
                " new tokens in k and v need ", r.seqlen + n);
    TORCH_CHECK_VALUE(r.seqlen + n <= s.capacity, "cache_seqlens[", i, "] = ", r.seqlen, " plus ", n,
                      " new tokens in k and v overflows the cache of ", s.capacity, " positions");
    r.leftpad = leftpad ? leftpad[i] : 0;
    TORCH_CHECK_VALUE(r.leftpad >= 0 && r.leftpad <= r.seqlen, "cache_leftpad[", i, "] = ", r.leftpad,
                      " must be in [0, cache_seqlens[", i, "] = ", r.seqlen, "]");
    const int64_t row = idx ? idx[i] : i;
    TORCH_CHECK_VALUE(s.page > 0 || (row >= 0 && row < k_cache.size(0)), "cache_batch_idx[", i, "] = ", row,
                      " is outside k_cache's ", k_cache.size(0), " rows");
    r.first_token = s.page > 0 ? 0 : row * s.capacity;
  }
  if (idx && n > 0) {  // two q rows appending into one cache row would race
    std::vector<int32_t> sorted(idx, idx + b);
    std::sort(sorted.begin(), sorted.end());
    const auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    TORCH_CHECK_VALUE(dup == sorted.end(), "cache_batch_idx holds ", *dup,
                      " twice: rows that append k/v need distinct cache rows");
  }
  if (s.page > 0) {
    const at::Tensor& table = *o.block_table;
    const int32_t* t = table.data_ptr<int32_t>();
    const int64_t blocks = table.size(1), num_blocks = k_cache.size(0);
    std::vector<std::pair<int32_t, int64_t>> written;  // (block, row) of every block an append writes
    for (int64_t i = 0; i < b; ++i) {
      const CacheRow& r = rows[size_t(i)];
      const int64_t used = ceil_div(r.seqlen + n, s.page);  // blocks holding positions [0, seqlen + n)
      for (int64_t j = 0; j < used; ++j) {
        const int32_t blk = t[i * blocks + j];
        TORCH_CHECK_VALUE(blk >= 0 && blk < num_blocks, "block_table[", i, ", ", j, "] = ", blk,
                          " is outside the cache's ", num_blocks, " blocks");
        if (n > 0 && j >= r.seqlen / s.page) written.emplace_back(blk, i);
      }
    }
    std::sort(written.begin(), written.end());
    for (size_t w = 1; w < written.size(); ++w)
      TORCH_CHECK_VALUE(written[w].first != written[w - 1].first || written[w].second == written[w - 1].second,
                        "block_table: rows ", written[w - 1].second, " and ", written[w].second,
                        " both append into block ", written[w].first);
  }
  if (s.rotary_dim > 0) {
    // k is rotated at positions seqlen + t; q too when causal or local, else every q row at position seqlen.
    const bool per_token = causal || o.window_left >= 0 || o.window_right >= 0;
    const int64_t seqlen_ro = o.rotary_cos->size(0);
    for (int64_t i = 0; i < b; ++i) {
      const int64_t need = rows[size_t(i)].seqlen + std::max(n, per_token ? sq : 1);
      TORCH_CHECK_VALUE(need <= seqlen_ro, "rotary_cos/rotary_sin have ", seqlen_ro, " positions but row ", i,
                        " needs ", need, " (cache_seqlens[", i, "] = ", rows[size_t(i)].seqlen, ")");
    }
  }
  return rows;
}

}  // namespace

OutLse kvcache_cpu_launch(CM3LEON_KVCACHE_PARAMS) {
  const KvcacheOptions o{window_left, window_right,       softcap,        alibi_slopes,  rotary_cos, rotary_sin,
                         rotary_interleaved, cache_batch_idx, cache_leftpad, block_table, num_splits};
  const KvcacheShape s = check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, o);
  const std::vector<CacheRow> rows = cache_rows(q, k_cache, cache_seqlens, cache_seqlen, causal, o, s);
  const int64_t b = q.size(0), sq = q.size(1), hq = q.size(2), hkv = k_cache.size(2), d = q.size(3);
  const int64_t n = s.new_len, row_elems = hkv * d;
  const int32_t* table = block_table.has_value() ? block_table->data_ptr<int32_t>() : nullptr;
  const int64_t table_stride = table ? block_table->size(1) : 0;
  auto token = [&](int64_t i, int64_t pos) {  // cache token index of logical position pos of row i
    return table ? int64_t(table[i * table_stride + pos / s.page]) * s.page + pos % s.page
                 : rows[size_t(i)].first_token + pos;
  };
  const bool per_token = causal || window_left >= 0 || window_right >= 0;
  const DType dtype = float_dtype(q, "q");

  at::Tensor q_in = q;
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* cos = s.rotary_dim ? static_cast<const T*>(rotary_cos->data_ptr()) : nullptr;
    const T* sin = s.rotary_dim ? static_cast<const T*>(rotary_sin->data_ptr()) : nullptr;
    const int64_t half = s.rotary_dim / 2;
    // Token rows in parallel only when there are many (a prefill): decode's few rows stay on this thread.
    constexpr int64_t kRowsPerTask = 64;
    if (n > 0) {
      const T *ks = static_cast<const T*>(k->data_ptr()), *vs = static_cast<const T*>(v->data_ptr());
      T *kc = static_cast<T*>(k_cache.data_ptr()), *vc = static_cast<T*>(v_cache.data_ptr());
      at::parallel_for(0, b * n, kRowsPerTask, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {  // r = i * n + t; distinct rows write distinct slots (checked)
          const int64_t i = r / n, pos = rows[size_t(i)].seqlen + r % n, src = r * row_elems;
          const int64_t dst = token(i, pos) * row_elems;
          if (cos)
            rotary_token(ks + src, kc + dst, hkv, d, s.rotary_dim, cos + pos * half, sin + pos * half,
                         rotary_interleaved);
          else
            std::memcpy(kc + dst, ks + src, size_t(row_elems) * sizeof(T));
          std::memcpy(vc + dst, vs + src, size_t(row_elems) * sizeof(T));
        }
      });
    }
    if (cos) {  // q is rotated into a copy: the caller's q stays as given
      q_in = at::empty_like(q);
      const T* qs = static_cast<const T*>(q.data_ptr());
      T* qr = static_cast<T*>(q_in.data_ptr());
      at::parallel_for(0, b * sq, kRowsPerTask, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {  // r = i * sq + t
          const int64_t pos = rows[size_t(r / sq)].seqlen + (per_token ? r % sq : 0), at = r * hq * d;
          rotary_token(qs + at, qr + at, hq, d, s.rotary_dim, cos + pos * half, sin + pos * half,
                       rotary_interleaved);
        }
      });
    }
  });

  // Segment i: the visible keys [leftpad, seqlen + n) of row i; the causal diagonal and ALiBi distances are
  // relative to them. k_start is a token index of a contiguous cache, a logical position of a paged one.
  std::vector<Segment> segments(static_cast<size_t>(b));
  for (int64_t i = 0; i < b; ++i) {
    const CacheRow& r = rows[size_t(i)];
    segments[size_t(i)] = {i * sq, sq, (table ? 0 : r.first_token) + r.leftpad, r.seqlen + n - r.leftpad,
                           i * hq * sq};
  }
  Problem p{dtype, segments.data(), b, hq, hkv, d, sq, float(softmax_scale), causal, at::get_num_threads()};
  p.window_left = window_left;
  p.window_right = window_right;
  p.softcap = float(softcap);
  p.alibi_slopes = alibi_slopes.has_value() ? alibi_slopes->data_ptr<float>() : nullptr;
  p.alibi_segment_stride = s.alibi_stride;
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({b, hq, sq}, q.options().dtype(at::kFloat));
  const DecodeLayout layout{table, table_stride, s.page, num_splits};
  if (decode_cpu(p, layout, q_in.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
                 lse.data_ptr<float>()))
    return {out, lse};
  if (!table) {
    forward_cpu(p, q_in.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), lse.data_ptr<float>());
    return {out, lse};
  }
  // Long queries on a paged cache: the tiled forward wants each segment's keys contiguous, so the pages are
  // gathered into a scratch copy first. That is O(keys * head_dim) against the attention's
  // O(queries * keys * head_dim), and decode (the per-token case) reads the pages in place instead.
  int64_t total = 0;
  for (const Segment& sg : segments) total += sg.k_len;
  at::Tensor kg = at::empty({total, hkv, d}, k_cache.options()), vg = at::empty({total, hkv, d}, v_cache.options());
  const int64_t row_bytes = row_elems * k_cache.element_size();
  const char *kc = static_cast<const char*>(k_cache.data_ptr()), *vc = static_cast<const char*>(v_cache.data_ptr());
  char *kd = static_cast<char*>(kg.data_ptr()), *vd = static_cast<char*>(vg.data_ptr());
  int64_t at_token = 0;
  for (int64_t i = 0; i < b; ++i) {
    Segment& sg = segments[size_t(i)];
    for (int64_t j = 0; j < sg.k_len; ++j, ++at_token) {
      const int64_t src = token(i, sg.k_start + j) * row_bytes;
      std::memcpy(kd + at_token * row_bytes, kc + src, size_t(row_bytes));
      std::memcpy(vd + at_token * row_bytes, vc + src, size_t(row_bytes));
    }
    sg.k_start = at_token - sg.k_len;
  }
  forward_cpu(p, q_in.data_ptr(), kg.data_ptr(), vg.data_ptr(), out.data_ptr(), lse.data_ptr<float>());
  return {out, lse};
}

}  // namespace cm3leon::attention
