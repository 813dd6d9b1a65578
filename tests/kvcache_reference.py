"""The float64 (or any dtype) reference of the KV-cache op with every FlashAttention 2.8 feature, built from
plain torch: append the new k/v (rotated) into the logical cache rows, then attend. Shared by
test_kvcache_features.py and the fuzz cases. A case is a dict: q, k, v (or None), k_cache, v_cache, seqlens,
leftpad, cache_batch_idx, block_table (or None each), scale, causal, window (left, right), softcap, alibi, cos,
sin (or None), interleaved."""
from __future__ import annotations

import torch


def rope(x, cos, sin, pos, interleaved):
    """x (s, h, d) rotated at positions pos (s,) by the tables' rows; features past rotary_dim unchanged."""
    half = cos.shape[1]
    c, s = cos[pos][:, None], sin[pos][:, None]  # (s, 1, half)
    x = x.clone()
    if interleaved:
        a, b = x[..., 0:2 * half:2].clone(), x[..., 1:2 * half:2].clone()
        x[..., 0:2 * half:2], x[..., 1:2 * half:2] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., :half].clone(), x[..., half:2 * half].clone()
        x[..., :half], x[..., half:2 * half] = a * c - b * s, a * s + b * c
    return x


def logical_rows(cache, case):
    """(batch, capacity, heads_kv, d): the cache rows q's batch rows use, in logical position order."""
    if case["block_table"] is not None:
        return cache[case["block_table"].long()].flatten(1, 2)
    idx = case["cache_batch_idx"]
    return cache[idx.long()] if idx is not None else cache


def reference(case, ct):
    """(out, lse, k_rows, v_rows) computed in dtype ct: appended (rotated) logical cache rows and attention."""
    q, k, v, seqlens = case["q"], case["k"], case["v"], case["seqlens"]
    b, sq, hq, d = q.shape
    kr, vr = logical_rows(case["k_cache"], case).to(ct), logical_rows(case["v_cache"], case).to(ct)
    group = hq // kr.shape[2]
    n = 0 if k is None else k.shape[1]
    wl, wr = case["window"]
    per_token = case["causal"] or wl >= 0 or wr >= 0
    qc = q.to(ct)
    cos, sin = (None, None) if case["cos"] is None else (case["cos"].to(ct), case["sin"].to(ct))
    out = torch.zeros(b, sq, hq, d, dtype=ct)
    lse = torch.full((b, hq, sq), float("-inf"), dtype=ct)
    for i in range(b):
        s0, lp = int(seqlens[i]), int(case["leftpad"][i]) if case["leftpad"] is not None else 0
        if n:
            kn = k[i].to(ct)
            if cos is not None:
                kn = rope(kn, cos, sin, torch.arange(s0, s0 + n), case["interleaved"])
            kr[i, s0:s0 + n], vr[i, s0:s0 + n] = kn, v[i].to(ct)
        qi = qc[i]
        if cos is not None:
            pos = torch.arange(s0, s0 + sq) if per_token else torch.full((sq,), s0)
            qi = rope(qi, cos, sin, pos, case["interleaved"])
        kk = kr[i, lp:s0 + n].repeat_interleave(group, 1)
        vv = vr[i, lp:s0 + n].repeat_interleave(group, 1)
        sk = kk.shape[0]
        s = torch.einsum("qhd,khd->hqk", qi, kk) * case["scale"]
        if case["softcap"] > 0:
            s = case["softcap"] * torch.tanh(s / case["softcap"])
        diag = torch.arange(sq)[:, None] + sk - sq
        j = torch.arange(sk)[None]
        if case["alibi"] is not None:
            slopes = case["alibi"][i] if case["alibi"].dim() == 2 else case["alibi"]
            s = s - slopes.to(ct)[:, None, None] * (diag - j).abs().to(ct)
        vis = torch.ones(sq, sk, dtype=torch.bool)
        if case["causal"]:
            vis &= j <= diag
        if wl >= 0:
            vis &= j >= diag - wl
        if wr >= 0:
            vis &= j <= diag + wr
        s = s.masked_fill(~vis, float("-inf"))
        l = torch.logsumexp(s, -1)
        p = torch.where(vis, torch.exp(s - l[..., None]), torch.zeros((), dtype=ct))
        out[i] = torch.einsum("hqk,khd->qhd", p, vv)
        lse[i] = l
    return out, lse, kr, vr
