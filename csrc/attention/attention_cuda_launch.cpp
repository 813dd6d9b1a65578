// at::Tensor glue of the CUDA attention forward: validate, allocate out/lse, fill AttnParams, launch on the
// current stream. No host sync.
#include "attention/attention_launch.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/index_select.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <utility>

#include "attention/attention_checks.h"
#include "attention/attention_cuda.h"
#include "attention/attention_cuda_extras.h"
#include "attention/attention_cuda_params.cuh"
#include "attention/attention_kvcache_checks.h"
#include "attention/attention_kvcache_cuda.h"
#include "common/tensor_checks.h"

namespace cm3leon::attention {

namespace {

using OutLse = std::tuple<at::Tensor, at::Tensor>;

// The kernels move 16-byte chunks: rows are (head dim % 8 == 0), base pointers must be too (the forward
// launchers pass aligned16 copies of what they only read).
void check_aligned(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
                    " must start on a 16-byte boundary on CUDA (a view at an odd offset? use .clone())");
}

void check_fits_grid(int64_t value, const char* what) {
  TORCH_CHECK_VALUE(value <= 65535, "CUDA attention supports at most 65535 ", what, ", got ", value);
}

void check_fits_int(int64_t value, const char* what) {
  TORCH_CHECK_VALUE(value <= std::numeric_limits<int32_t>::max(), what, " (", value, ") must fit in int32");
}

cuda::AttnParams base_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                             at::Tensor& lse, double softmax_scale, bool causal) {
  check_softmax_scale(softmax_scale);
  cuda::AttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.heads_q = int(q.size(-2));
  p.heads_kv = int(k.size(-2));
  p.head_dim = int(q.size(-1));
  p.q_row_stride = q.size(-2) * q.size(-1);
  p.k_row_stride = k.size(-2) * k.size(-1);
  p.scale = float(softmax_scale);
  p.causal = causal;
  check_fits_grid(p.heads_q, "query heads");
  check_aligned(q, "q");
  check_aligned(k, "k");
  check_aligned(v, "v");
  return p;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " CUDA launch failed: ", cudaGetErrorString(err));
}

}  // namespace

void set_extras(cuda::AttnParams& p, int64_t window_left, int64_t window_right, double softcap,
                const std::optional<at::Tensor>& alibi_slopes, int64_t alibi_stride) {
  // A window wider than any sequence is the same as an unbounded one.
  p.window_left = int(std::clamp<int64_t>(window_left, -1, std::numeric_limits<int32_t>::max()));
  p.window_right = int(std::clamp<int64_t>(window_right, -1, std::numeric_limits<int32_t>::max()));
  p.softcap = float(softcap);
  p.alibi_slopes = alibi_slopes.has_value() ? alibi_slopes->data_ptr<float>() : nullptr;
  p.alibi_batch_stride = int(alibi_stride);
}

void set_dense_layout(cuda::AttnParams& p, const at::Tensor& q, const at::Tensor& k) {
  p.batch = int(q.size(0));
  p.seqlen_q = int(q.size(1));
  p.seqlen_k = int(k.size(1));
  p.k_batch_tokens = k.size(1);
  p.total_q = q.size(0) * q.size(1);
  p.total_k = k.size(0) * k.size(1);
  p.lse_head_stride = q.size(1);
}

OutLse forward_cuda_launch(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                           double softmax_scale, bool causal, CM3LEON_ATTN_EXTRA_PARAMS) {
  check_qkv(q_in, k_in, v_in, 4);
  TORCH_CHECK_VALUE(k_in.size(0) == q_in.size(0), "k's batch (", k_in.size(0), ") must equal q's (", q_in.size(0),
                    ")");
  const int64_t alibi_stride = check_extras(q_in, q_in.size(0), window_left, window_right, softcap, alibi_slopes);
  check_cuda_support(q_in, false, dropout_p);  // the forward only carries `deterministic` for autograd
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned16(q_in), k = aligned16(k_in), v = aligned16(v_in);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  cuda::AttnParams p = base_params(q, k, v, out, lse, softmax_scale, causal);
  set_extras(p, window_left, window_right, softcap, alibi_slopes, alibi_stride);
  check_fits_grid(q.size(0), "batch rows");
  check_fits_int(q.size(1), "seqlen_q");
  check_fits_int(k.size(1), "seqlen_k");
  set_dense_layout(p, q, k);
  check_launch(cuda::forward_cuda(float_dtype(q, "q"), p, c10::cuda::getCurrentCUDAStream()),
               "flash_attn_forward");
  return {out, lse};
}

OutLse varlen_forward_cuda_launch(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                  const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k,
                                  int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale, bool causal,
                                  CM3LEON_ATTN_EXTRA_PARAMS) {
  check_qkv(q_in, k_in, v_in, 3);
  check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", q_in);
  check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", q_in);
  TORCH_CHECK_VALUE(cu_seqlens_q.size(0) == cu_seqlens_k.size(0),
                    "cu_seqlens_q and cu_seqlens_k must have the same length, got ", cu_seqlens_q.size(0), " and ",
                    cu_seqlens_k.size(0));
  const int64_t alibi_stride =
      check_extras(q_in, cu_seqlens_q.size(0) - 1, window_left, window_right, softcap, alibi_slopes);
  check_cuda_support(q_in, false, dropout_p);
  TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0, "max_seqlen_q and max_seqlen_k must be >= 0");
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned16(q_in), k = aligned16(k_in), v = aligned16(v_in);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));
  cuda::AttnParams p = base_params(q, k, v, out, lse, softmax_scale, causal);
  set_extras(p, window_left, window_right, softcap, alibi_slopes, alibi_stride);
  check_fits_grid(cu_seqlens_q.size(0) - 1, "documents");
  check_fits_int(max_seqlen_q, "max_seqlen_q");
  check_fits_int(max_seqlen_k, "max_seqlen_k");
  p.batch = int(cu_seqlens_q.size(0) - 1);
  // The grid covers max_seqlen_q rows per document; kernels stride over longer documents, so a too-small
  // max_seqlen_q costs time, not correctness (at least one row block when there are tokens).
  p.seqlen_q = int(q.size(0) > 0 && max_seqlen_q == 0 ? 1 : max_seqlen_q);
  p.seqlen_k = int(max_seqlen_k);
  p.cu_seqlens_q = cu_seqlens_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_seqlens_k.data_ptr<int32_t>();
  p.total_q = q.size(0);
  p.total_k = k.size(0);
  p.lse_head_stride = q.size(0);
  check_launch(cuda::forward_cuda(float_dtype(q, "q"), p, c10::cuda::getCurrentCUDAStream()),
               "flash_attn_varlen_forward");
  return {out, lse};
}

OutLse kvcache_cuda_launch(CM3LEON_KVCACHE_PARAMS) {
  const KvcacheOptions o{window_left, window_right,       softcap,        alibi_slopes,  rotary_cos, rotary_sin,
                         rotary_interleaved, cache_batch_idx, cache_leftpad, block_table, num_splits};
  const KvcacheShape s = check_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale, o);
  const int64_t new_len = s.new_len;
  // q's rotary positions advance per token when causal or local (FlashAttention's rule).
  const bool per_token = causal || window_left >= 0 || window_right >= 0;
  check_cuda_support(q, false);
  const int64_t b = q.size(0), sq = q.size(1), hq = q.size(2), hkv = k_cache.size(2), d = q.size(3);
  if (!cache_seqlens.has_value()) {  // host-known positions are checked; device ones are clamped by the kernels
    TORCH_CHECK_VALUE(cache_seqlen >= 0, "cache_seqlens = ", cache_seqlen, " must be >= 0");
    // A paged row too short is a RuntimeError naming block_table, as on the CPU (and in FlashAttention).
    TORCH_CHECK(s.page == 0 || cache_seqlen + new_len <= s.capacity, "block_table: rows have ", s.capacity,
                " positions, but cache_seqlens = ", cache_seqlen, " plus ", new_len, " new tokens need ",
                cache_seqlen + new_len);
    TORCH_CHECK_VALUE(cache_seqlen + new_len <= s.capacity, "cache_seqlens = ", cache_seqlen, " plus ", new_len,
                      " new tokens overflows the cache of ", s.capacity, " positions");
    if (s.rotary_dim > 0) {
      const int64_t need = cache_seqlen + std::max(new_len, per_token ? sq : 1);
      TORCH_CHECK_VALUE(need <= rotary_cos->size(0), "rotary_cos/rotary_sin have ", rotary_cos->size(0),
                        " positions but the rows need ", need);
    }
  }
  check_fits_grid(b, "batch rows");
  check_fits_grid(hkv, "kv heads");
  check_fits_int(sq, "seqlen_q");
  check_fits_int(s.capacity, "the cache length");
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int32_t* seqlens = cache_seqlens.has_value() ? cache_seqlens->data_ptr<int32_t>() : nullptr;
  check_aligned(k_cache, "k_cache");  // before the append's 16-byte stores, not only in base_params
  check_aligned(v_cache, "v_cache");

  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({b, hq, sq}, q.options().dtype(at::kFloat));
  cuda::AttnParams p = base_params(q, k_cache, v_cache, out, lse, softmax_scale, causal);
  set_extras(p, window_left, window_right, softcap, alibi_slopes, s.alibi_stride);
  p.batch = int(b);
  p.seqlen_q = int(sq);
  p.seqlen_k = int(cache_seqlen + new_len);
  p.k_batch_tokens = s.capacity;
  p.cache_seqlens = seqlens;
  p.cache_extra = int(new_len);
  p.total_q = b * sq;
  p.total_k = b * s.capacity;
  p.lse_head_stride = sq;
  cuda::KvLayout layout;
  layout.capacity = s.capacity;
  if (block_table.has_value()) {
    layout.block_table = block_table->data_ptr<int32_t>();
    layout.table_stride = block_table->size(1);
    layout.page = s.page;
    layout.num_blocks = k_cache.size(0);
  }
  if (cache_batch_idx.has_value()) {
    layout.cache_batch_idx = cache_batch_idx->data_ptr<int32_t>();
    layout.cache_rows = k_cache.size(0);
  }
  if (cache_leftpad.has_value()) layout.cache_leftpad = cache_leftpad->data_ptr<int32_t>();
  // Only the decode kernel reads through the layout (the tiled forward gets gathered rows, below, but has no
  // per-row key start); refuse before the caches are written.
  const bool decode = cuda::decode_applies(p);
  TORCH_CHECK_NOT_IMPLEMENTED(decode || sq == 0 || !cache_leftpad.has_value(),
                              "flash_attn_kvcache on CUDA: cache_leftpad needs at most ", cuda::kDecodeMaxRows,
                              " query rows per kv head (the decode kernel); got ", hq / hkv * sq, " (CPU only for now)");

  const DType dtype = float_dtype(q, "q");
  auto rotate = [&](const at::Tensor& src, void* dst, bool per_token, bool into_cache, const char* what) {
    const cuda::RotaryCall call{src.data_ptr(), dst, src.size(0), src.size(1), src.size(2), d,
                                rotary_cos->data_ptr(), rotary_sin->data_ptr(), s.rotary_dim, rotary_cos->size(0),
                                rotary_interleaved, per_token, into_cache, seqlens, int32_t(cache_seqlen), layout};
    check_launch(cuda::rotary_cuda(dtype, call, stream), what);
  };
  if (new_len > 0) {
    check_aligned(*k, "k");
    check_aligned(*v, "v");
    const int64_t row = hkv * d;
    if (s.rotary_dim > 0)
      rotate(*k, k_cache.data_ptr(), true, true, "flash_attn_kvcache (rotary k)");
    else
      check_launch(cuda::append_kv_cuda(k_cache.element_size(), k->data_ptr(), k_cache.data_ptr(), b, new_len, row,
                                        seqlens, int32_t(cache_seqlen), layout, stream),
                   "flash_attn_kvcache (append k)");
    check_launch(cuda::append_kv_cuda(v_cache.element_size(), v->data_ptr(), v_cache.data_ptr(), b, new_len, row,
                                      seqlens, int32_t(cache_seqlen), layout, stream),
                 "flash_attn_kvcache (append v)");
  }
  at::Tensor q_rotated;
  if (s.rotary_dim > 0) {  // q is rotated into a copy: the caller's q stays as given
    q_rotated = at::empty_like(q);
    rotate(q, q_rotated.data_ptr(), per_token, false, "flash_attn_kvcache (rotary q)");
    p.q = q_rotated.data_ptr();
  }
  if (decode) {
    int sm_count = 0;
    check_launch(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, q.get_device()),
                 "flash_attn_kvcache (device query)");
    const int auto_splits = cuda::decode_num_splits(p, sm_count);
    const int splits = num_splits > 0 ? int(std::min<int64_t>(auto_splits, num_splits)) : auto_splits;
    // Workspace for the per-split partial results (only when the key range is split): the op's one
    // allocation beyond its outputs, from the caching allocator.
    const int64_t ws_floats = cuda::decode_workspace_floats(p, splits);
    at::Tensor ws = at::empty({ws_floats}, q.options().dtype(at::kFloat));
    check_launch(cuda::decode_cuda(dtype, p, layout, splits, ws_floats > 0 ? ws.data_ptr<float>() : nullptr, stream),
                 "flash_attn_kvcache");
  } else {
    // Long queries on a paged cache or through cache_batch_idx: each q row's cache row is gathered into a
    // contiguous [batch, capacity] copy first (device ops, no host sync; ids clamped as in the decode kernel).
    // The copy is O(capacity * head_dim) per row against the attention's O(queries * keys * head_dim).
    at::Tensor k_rows, v_rows;
    if (block_table.has_value() || cache_batch_idx.has_value()) {
      const at::Tensor ids = block_table.has_value() ? block_table->flatten().clamp(0, k_cache.size(0) - 1)
                                                     : cache_batch_idx->clamp(0, k_cache.size(0) - 1);
      k_rows = k_cache.index_select(0, ids).view({b, s.capacity, hkv, d});
      v_rows = v_cache.index_select(0, ids).view({b, s.capacity, hkv, d});
      p.k = k_rows.data_ptr();
      p.v = v_rows.data_ptr();
    }
    check_launch(cuda::forward_cuda(dtype, p, stream), "flash_attn_kvcache");
  }
  return {out, lse};
}

}  // namespace cm3leon::attention
