"""Baseline attention: the same model with PyTorch's scaled_dot_product_attention.

This is what a user would write without our kernels: a block-diagonal causal mask for packed documents, and
for the KV cache an index write of the new keys/values plus a padding mask for ragged rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cm3leon.model import AttentionBackend


def _sdpa(q, k, v, mask=None, causal=False, scale=None):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         is_causal=causal and mask is None, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


# FlashAttention's signatures for the arguments the model passes; the rest is keyword-only and absent, so an
# argument this baseline cannot honour raises TypeError instead of being ignored.
def flash_attn_func(q, k, v, *, softmax_scale=None, causal=False):
    return _sdpa(q, k, v, causal=causal, scale=softmax_scale)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                           softmax_scale=None, causal=False):
    doc = torch.repeat_interleave(torch.arange(len(cu_seqlens_q) - 1), cu_seqlens_q.diff().long())
    mask = doc[:, None] == doc[None, :]
    if causal:
        mask &= torch.ones_like(mask).tril()
    return _sdpa(q[None], k[None], v[None], mask=mask, scale=softmax_scale)[0]


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens, softmax_scale=None,
                            causal=False):
    b, s = q.shape[:2]
    starts = cache_seqlens.long()
    rows = torch.arange(b)[:, None]
    cols = starts[:, None] + torch.arange(s)[None, :]
    k_cache[rows, cols] = k
    v_cache[rows, cols] = v
    kv_len = int((starts + s).max())
    key_pos = torch.arange(kv_len)[None, None, :]
    query_pos = cols[:, :, None]
    mask = key_pos <= query_pos if causal else key_pos < (starts + s)[:, None, None]
    return _sdpa(q, k_cache[:, :kv_len], v_cache[:, :kv_len], mask=mask[:, None], scale=softmax_scale)


SDPA = AttentionBackend(flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache)
