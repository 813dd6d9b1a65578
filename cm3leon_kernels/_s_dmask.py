"""S_dmask, FlashAttention's testing output for dropout (``return_attn_probs=True`` with ``dropout_p > 0``).

``(batch, nheads, seqlen_q, seqlen_k)`` in q's dtype (varlen: ``(batch, nheads, max_seqlen_q, max_seqlen_k)``,
each document top-left): ``exp(score - row_max)``, ``row_max`` the maximum over the keys the query sees, with
every feature applied to the scores; negated where dropout dropped the element, 0 where the key is hidden (and
outside a document). Plain PyTorch, O(seqlen_q * seqlen_k), from :mod:`cm3leon_kernels.reference`'s scores
in float32; the signs come from ``flash_attn_dropout_mask``, the kernels' own mask function.
"""
from __future__ import annotations

import torch

from . import reference
from ._native import ops


def _signed(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    e, _ = reference.softmax_numerator(scores)
    return torch.where(keep | torch.isneginf(scores), e, -e)


@torch.no_grad()
def dense_s_dmask(q, k, dropout_seed, dropout_p, softmax_scale, window, softcap, alibi_slopes):
    """S_dmask of ``flash_attn_forward``'s call with these (normalised) arguments; window = (left, right)."""
    scores = reference.attention_scores(q.float(), k.float(), softmax_scale, False, window, softcap,
                                        alibi_slopes)
    keep = ops.flash_attn_dropout_mask(dropout_seed, *scores.shape, dropout_p)
    return _signed(scores, keep).to(q.dtype)


@torch.no_grad()
def varlen_s_dmask(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_seed, dropout_p,
                   softmax_scale, window, softcap, alibi_slopes):
    """S_dmask of ``flash_attn_varlen_forward``'s call: document b's block at the top left of row b."""
    docs, nheads = cu_seqlens_q.shape[0] - 1, q.shape[1]
    keep = ops.flash_attn_dropout_mask(dropout_seed, docs, nheads, max_seqlen_q, max_seqlen_k, dropout_p)
    s_dmask = q.new_zeros((docs, nheads, max_seqlen_q, max_seqlen_k))
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(docs):
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        qb, kb = q[None, cq[b]:cq[b + 1]].float(), k[None, ck[b]:ck[b + 1]].float()
        scores = reference.attention_scores(qb, kb, softmax_scale, False, window, softcap, slopes)
        s_dmask[b, :, :lq, :lk] = _signed(scores, keep[b:b + 1, :, :lq, :lk])[0]
    return s_dmask
