"""Plain-PyTorch implementations of every op: the test oracle (run in float64) and the benchmark baseline.

They materialise whatever is convenient (full distance matrices, sorted vocabularies); they are meant to be
obviously right, not fast.
"""
from __future__ import annotations

import torch

__all__ = ["vq_distances", "vq_nearest", "vq_embed", "attention", "attention_varlen",
           "attention_with_kvcache"]


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

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float | None = None,
              causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention on ``(batch, seqlen, nheads, headdim)`` tensors, in the inputs' dtype.

    Materialises the full score matrix with an explicit mask. GQA/MQA: k/v heads are repeated
    (``repeat_interleave``) to q's head count. The causal mask is bottom-right aligned (query ``i`` sees keys
    ``j <= i + Sk - Sq``). Returns ``(out, lse)`` with ``lse [batch, nheads, seqlen_q]`` (natural log; rows
    that see no key get ``out = 0`` and ``lse = -inf``). Differentiable (for gradient references).
    """
    sq, hq, d = q.shape[1], q.shape[2], q.shape[3]
    sk, hkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    k = k.repeat_interleave(hq // hkv, dim=2)
    v = v.repeat_interleave(hq // hkv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + sk - sq, float("-inf"))
    # Softmax that gives 0 (not NaN) for fully masked rows, with finite gradients everywhere.
    row_max = scores.amax(dim=-1, keepdim=True).detach() if sk else scores.new_zeros(scores.shape[:-1] + (1,))
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    e = torch.exp(scores - row_max)
    denom = e.sum(dim=-1, keepdim=True)
    p = e / torch.where(denom == 0, torch.ones_like(denom), denom)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v)
    lse = (torch.log(denom) + row_max).squeeze(-1)
    return out, lse


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, softmax_scale: float | None = None, causal: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference packed-document attention: :func:`attention` per document on ``(tokens, nheads, headdim)``.
    Returns ``(out, lse [nheads, total_q])``."""
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(cq) - 1):
        o, lse = attention(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]], v[None, ck[b]:ck[b + 1]],
                           softmax_scale, causal)
        outs.append(o[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1)


def attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k: torch.Tensor | None = None, v: torch.Tensor | None = None,
                           cache_seqlens: torch.Tensor | int | None = None,
                           softmax_scale: float | None = None, causal: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference KV-cache attention: writes k/v into the caches (in place) at ``cache_seqlens`` per row, then
    attends each row's queries to its ``cache_seqlens[b] + new`` valid keys. Returns ``(out, lse)``."""
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
