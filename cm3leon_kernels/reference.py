"""Plain-PyTorch implementations of every op: the test oracle (run in float64) and the benchmark baseline.

They materialise whatever is convenient (full distance matrices, sorted vocabularies); they are meant to be
obviously right, not fast.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["vq_distances", "vq_nearest", "vq_embed", "attention_scores", "softmax_numerator", "attention",
           "attention_varlen", "attention_with_kvcache", "cfg_mix", "cfg_probs", "contrastive_probs",
           "hf_chain_sample", "linear_cross_entropy"]


def vq_distances(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """The full ``[N, K]`` distance matrix for ``z [N, D]`` in the dtype of the inputs."""
    if metric == "l2":
        return ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)
    zn = z.norm(dim=-1, keepdim=True)
    cn = codebook.norm(dim=-1)
    cos = (z @ codebook.T) / (zn * cn[None, :])
    cos = torch.where((zn == 0) | (cn[None, :] == 0), torch.zeros_like(cos), cos)
    return 1 - cos


def vq_nearest(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference nearest-code search over ``z [..., D]``; lowest index on ties."""
    flat = z.reshape(-1, z.shape[-1])
    dist = vq_distances(flat, codebook, metric)
    best = dist.argmin(dim=1)
    return best.view(z.shape[:-1]), dist.gather(1, best[:, None])[:, 0].view(z.shape[:-1])


def vq_embed(indices: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    return codebook[indices]


# ---- Attention ---------------------------------------------------------------------------------------------

def attention_scores(q: torch.Tensor, k: torch.Tensor, softmax_scale: float | None = None,
                     causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """The scores ``[batch, nheads, seqlen_q, seqlen_k]`` that :func:`attention` takes the softmax of, with
    every feature applied and ``-inf`` where a key is hidden, in the inputs' dtype. Differentiable."""
    sq, hq, d = q.shape[1:]
    sk, hkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    k = k.repeat_interleave(hq // hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    diag = i + sk - sq
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(scores.dtype).reshape(-1, hq)[:, :, None, None]  # (1 or batch, heads, 1, 1)
        scores = scores - slopes * (diag - j).abs().to(scores.dtype)
    hidden = torch.zeros(sq, sk, dtype=torch.bool, device=q.device)
    if window_size[0] >= 0:
        hidden |= j < diag - window_size[0]
    if window_size[1] >= 0:
        hidden |= j > diag + window_size[1]
    if causal:
        hidden |= j > diag
    return scores.masked_fill(hidden, float("-inf"))


def softmax_numerator(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(exp(scores - row_max), row_max)`` over the last dim, ``row_max`` (detached, keepdim) the maximum of
    the visible scores, 0 for rows that see no key: they get 0, not NaN, with finite gradients everywhere."""
    if scores.shape[-1] == 0:
        return scores, scores.new_zeros(scores.shape[:-1] + (1,))
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    return torch.exp(scores - row_max), row_max


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None,
              causal: bool = False, window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
              alibi_slopes: torch.Tensor | None = None, dropout_p: float = 0.0,
              dropout_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention on ``(batch, seqlen, nheads, headdim)`` tensors, in the inputs' dtype.

    Materialises the full score matrix with an explicit mask. GQA/MQA: k/v heads are repeated
    (``repeat_interleave``) to q's head count. Query ``i``'s diagonal is ``d = i + Sk - Sq`` (bottom-right
    alignment); it sees key ``j`` when ``d - window_size[0] <= j <= d + window_size[1]`` (-1: that side
    unbounded) and, if causal, ``j <= d``. Scores are ``softmax_scale * q.k``, then ``softcap * tanh(s /
    softcap)`` when ``softcap > 0``, then minus ``alibi_slopes[b, h] * |d - j|`` (slopes ``(nheads,)`` or
    ``(batch, nheads)``). With ``dropout_mask`` (bool ``[batch, nheads, seqlen_q, seqlen_k]``, True = kept)
    the probabilities are ``P * mask / (1 - dropout_p)``; lse stays that of the undropped scores. Returns
    ``(out, lse)`` with ``lse [batch, nheads, seqlen_q]`` (natural log; rows that see no key get ``out = 0``
    and ``lse = -inf``). Differentiable (for gradient references).
    """
    hq, hkv = q.shape[2], k.shape[2]
    v = v.repeat_interleave(hq // hkv, dim=2)
    e, row_max = softmax_numerator(attention_scores(q, k, softmax_scale, causal, window_size, softcap,
                                                    alibi_slopes))
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    if dropout_mask is not None:
        p = p * dropout_mask.to(p.dtype) / (1 - dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    lse = (torch.log(denom) + row_max).squeeze(-1)
    return out, lse


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, softmax_scale: float | None = None, causal: bool = False,
                     window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: torch.Tensor | None = None, dropout_p: float = 0.0,
                     dropout_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference packed-document attention: :func:`attention` per document on ``(tokens, nheads, headdim)``
    (``alibi_slopes`` ``(nheads,)`` or ``(documents, nheads)``; ``dropout_mask`` ``[documents, nheads,
    max_seqlen_q, max_seqlen_k]``, each document's block top-left). Returns
    ``(out, lse [nheads, total_q])``."""
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        lq, lk = cq[b + 1] - cq[b], ck[b + 1] - ck[b]
        mask = None if dropout_mask is None else dropout_mask[b:b + 1, :, :lq, :lk]
        o, lse = attention(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
                           softmax_scale, causal, window_size, softcap, slopes, dropout_p, mask)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                           cache_seqlens: torch.Tensor | int | None = None,
                           softmax_scale: float | None = None, causal: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference KV-cache attention: writes k/v into the caches (in place) at ``cache_seqlens`` per row, then
    attends each row's queries to its ``cache_seqlens[b] + new`` valid keys. Returns ``(out, lse)``. Not
    causal by default, as ``flash_attn_with_kvcache``."""
    b, cache_len = q.shape[0], k_cache.shape[1]
    if cache_seqlens is None:
        starts = [cache_len] * b
    elif isinstance(cache_seqlens, int):
        starts = [cache_seqlens] * b
    else:
        starts = cache_seqlens.tolist()
    new = 0 if k is None else k.shape[1]
    outs, lses = [], []
    for i in range(b):
        if new:
            k_cache[i, starts[i]:starts[i] + new] = k[i]
            v_cache[i, starts[i]:starts[i] + new] = v[i]
        n = starts[i] + new
        o, lse = attention(q[i:i + 1], k_cache[i:i + 1, :n], v_cache[i:i + 1, :n], softmax_scale, causal)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)
# ---- Sampling: the exact final distributions (float64) and the Hugging Face-style chain baseline ---------

def cfg_mix(logits: torch.Tensor, guidance_scale: float | Sequence[float] | None) -> torch.Tensor:
    """The guided logits ``[B, V]`` in float64 for ``logits [B, S, V]`` (stream order as ``cfg_sample``);
    a token with ``-inf`` in any stream is ``-inf``."""
    x = logits.double()
    streams = x.shape[1]
    if streams == 1:
        mixed = x[:, 0]
    elif streams == 2:
        mixed = x[:, 0] + guidance_scale * (x[:, 1] - x[:, 0])
    else:
        s_img, s_txt = guidance_scale
        mixed = x[:, 0] + s_img * (x[:, 1] - x[:, 0]) + s_txt * (x[:, 2] - x[:, 1])
    excluded = torch.isneginf(x).any(dim=1)
    return mixed.masked_fill(excluded, -math.inf)


def _restrict(z: torch.Tensor, allowed_range: Sequence[int] | None, allowed_mask: torch.Tensor | None
              ) -> torch.Tensor:
    keep = torch.ones_like(z, dtype=torch.bool)
    if allowed_range is not None:
        keep[:, :allowed_range[0]] = False
        keep[:, allowed_range[1]:] = False
    if allowed_mask is not None:
        keep &= allowed_mask.expand_as(keep)
    return z.masked_fill(~keep, -math.inf)


def _one_hot_argmax(z: torch.Tensor) -> torch.Tensor:
    # torch.argmax returns the first maximal index, the kernels' tie rule.
    return torch.nn.functional.one_hot(z.argmax(dim=-1), z.shape[-1]).double()


def _top_k_threshold(z: torch.Tensor, k: int) -> torch.Tensor:
    """z with every value below the k-th largest finite value set to -inf (ties at the boundary kept)."""
    if k <= 0:
        return z
    count = torch.isfinite(z).sum(dim=-1, keepdim=True)
    kth = z.sort(dim=-1, descending=True).values.gather(-1, (torch.clamp(count, max=k) - 1).clamp(min=0))
    return z.masked_fill(z < kth, -math.inf)


def _top_p_threshold(z: torch.Tensor, p: float) -> torch.Tensor:
    """Keeps token x iff the probability of the tokens with a strictly larger logit is < p (ties kept)."""
    if p >= 1.0:
        return z
    probs = torch.softmax(z, dim=-1)
    sorted_z, order = z.sort(dim=-1)
    cum = probs.gather(-1, order).cumsum(dim=-1)
    at_most = torch.searchsorted(sorted_z, z, right=True)  # tokens with a logit <= z_x, x included
    above = cum[:, -1:] - cum.gather(-1, at_most - 1)
    return z.masked_fill(above >= p, -math.inf)


def cfg_probs(logits: torch.Tensor, *, guidance_scale: float | Sequence[float] | None,
              temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
              allowed_range: Sequence[int] | None = None, allowed_mask: torch.Tensor | None = None
              ) -> torch.Tensor:
    """The exact float64 distribution ``[B, V]`` that ``cfg_sample`` draws from (one-hot for greedy).

    Every filter is a threshold on the tempered logits (ties at a boundary are kept), as in the kernel.
    """
    z = _restrict(cfg_mix(logits, guidance_scale), allowed_range, allowed_mask)
    if temperature == 0:
        return _one_hot_argmax(z)
    z = _top_k_threshold(z / temperature, top_k)
    z = _top_p_threshold(z, top_p)
    if min_p > 0:
        z = z.masked_fill(z < z.max(dim=-1, keepdim=True).values + math.log(min_p), -math.inf)
    return torch.softmax(z, dim=-1)


def contrastive_probs(expert_logits: torch.Tensor, amateur_logits: torch.Tensor, *, alpha: float = 0.1,
                      k: int = 1, temperature: float = 1.0, amateur_temperature: float = 1.0,
                      allowed_range: Sequence[int] | None = None, allowed_mask: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """The exact float64 CD-K distribution ``[B, V]`` that ``contrastive_sample`` draws from (one-hot for
    greedy), from docs/recipe.md §5: head set ``p_exp >= alpha · kth_largest_k(p_exp)``, scores
    ``log p_exp − log p_ama`` on it, softmax of ``score / temperature``."""
    e, a = expert_logits.double(), amateur_logits.double()
    excluded = torch.isneginf(e) | torch.isneginf(a)
    e = _restrict(e.masked_fill(excluded, -math.inf), allowed_range, allowed_mask)
    a = a.masked_fill(torch.isneginf(e), -math.inf)
    a = a / amateur_temperature
    lse_e, lse_a = torch.logsumexp(e, -1, keepdim=True), torch.logsumexp(a, -1, keepdim=True)
    # log p_exp = e - lse_e, log p_ama = a - lse_a. Written as (e - a) + (lse_a - lse_e) and the head test
    # on e itself so that exact ties (e.g. integer logits) stay exact ties.
    count = torch.isfinite(e).sum(dim=-1, keepdim=True)
    kth = e.sort(dim=-1, descending=True).values.gather(-1, torch.clamp(count, max=k) - 1)
    head = torch.isfinite(e) & (e >= kth + (math.log(alpha) if alpha > 0 else -math.inf))
    score = torch.where(head, (e - a) + (lse_a - lse_e), torch.full_like(e, -math.inf))
    if temperature == 0:
        return _one_hot_argmax(score)
    return torch.softmax(score / temperature, dim=-1)


def hf_chain_sample(logits: torch.Tensor, *, guidance_scale: float, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """The Hugging Face-style logits-processor chain (the benchmark baseline) for ``logits [B, 2, V]``:
    CFG mix, temperature, top-k (mask below the k-th value), top-p via a full sort, softmax, multinomial.
    Runs in the logits' dtype, as ``generate`` does."""
    scores = logits[:, 0] + guidance_scale * (logits[:, 1] - logits[:, 0])
    scores = scores / temperature
    if top_k > 0:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, sorted_indices = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False  # keep at least one token
        remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
        scores = scores.masked_fill(remove, -math.inf)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ---- Fused linear + cross-entropy ------------------------------------------------------------------------

def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         loss_weights: torch.Tensor | None = None, ignore_index: int = -100,
                         reduction: str = "mean", label_smoothing: float = 0.0, z_loss: float = 0.0,
                         softcap: float | None = None, return_lse: bool = False
                         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``F.cross_entropy(F.linear(hidden, weight), ...)`` with per-token weights, z-loss and soft-capping,
    materialising the ``[T, V]`` logits (upcast to float32 for 16-bit inputs, as training code does).
    Same semantics as :func:`cm3leon_kernels.linear_cross_entropy`; differentiable."""
    logits = torch.nn.functional.linear(hidden, weight)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    lse = torch.logsumexp(logits, dim=-1)
    valid = targets != ignore_index
    loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="none",
                                             label_smoothing=label_smoothing)
    loss = loss + z_loss * lse.square() * valid
    w = valid.to(loss.dtype) if loss_weights is None else loss_weights.to(loss.dtype) * valid
    loss = loss * w
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        total = w.sum()
        loss = loss.sum() / torch.where(total > 0, total, torch.ones_like(total))
    return (loss, lse.detach()) if return_lse else loss
