"""Shared by the attention tests (CPU, CUDA, per-ISA): inputs, the tolerance floors, and the checks against
the float64 reference that every device runs."""
from __future__ import annotations

import torch

import cm3leon_kernels as ck
from cm3leon_kernels import reference as ref

from helpers import assert_fa_rule, poisoned_outputs


EPS = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}


# Gradients cancel exactly in some cases (one visible key: dS = P (dO.v - dO.o) = 0) where plain PyTorch's
# error happens to be 0 too; the kernel's fp32 rounding of the O(|dO| |v| sqrt(d)) terms needs a floor.
GRAD_EPS = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


# The feature tests' floors: in float32 plain PyTorch's error can be ~0 where the kernel's fp32 accumulation
# order differs, so a small absolute floor; bf16/fp16: the FA rule's eps.
FEATURE_EPS = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-4}
FEATURE_GRAD_EPS = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def case_id(c):
    """A pytest id for a tuple of case parameters."""
    return "-".join(str(x).replace(" ", "") for x in c)


def random_slopes(kind, batch, heads):
    """ALiBi slopes in [0.05, 0.55): None, ``"heads"`` = ``(heads,)`` or ``"batch"`` = ``(batch, heads)``."""
    if kind is None:
        return None
    return torch.rand(heads if kind == "heads" else (batch, heads)) * 0.5 + 0.05


def random_tensor(*shape, dtype, scale=1.0, device="cpu"):
    """Standard normal values (times ``scale``) drawn in float32 on the CPU, then cast and moved."""
    return (torch.randn(*shape) * scale).to(device=device, dtype=dtype)


def leaves(*ts):
    return [t.detach().clone().requires_grad_() for t in ts]


def check_lse(lse, lse64, lseb, name):
    """lse: -inf exactly where the float64 reference has no key, the FA rule elsewhere."""
    finite = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), finite), f"{name}: lse finiteness differs from the reference"
    assert (lse[~finite] == float("-inf")).all(), f"{name}: rows without keys must have lse = -inf"
    assert_fa_rule(lse[finite], lse64[finite], lseb.float()[finite], name=f"{name} lse", eps=1e-5)


def check_against_reference(run, run_ref, inputs, dtype, name, grads=True, eps=EPS, grad_eps=GRAD_EPS):
    """FA rule for the output and (optionally) the gradients of q, k, v: the kernel's error against the
    float64 reference must be at most 2x plain PyTorch's error in the kernel's dtype (+ the floors ``eps`` /
    ``grad_eps`` per dtype). Rows that see no key must be 0 with lse -inf."""
    x = leaves(*inputs)
    with poisoned_outputs():
        out, lse = run(*x)
    x64 = leaves(*[t.double() for t in inputs])
    out64, lse64 = run_ref(*x64)
    xb = leaves(*inputs)
    outb, lseb = run_ref(*xb)
    assert_fa_rule(out, out64, outb, name=f"{name} out", eps=eps[dtype])
    check_lse(lse, lse64, lseb, name)
    # lse is [.., heads, queries], out [.., queries, heads, dim]
    empty = (~torch.isfinite(lse64)).transpose(-1, -2)
    assert (out.detach()[empty] == 0).all(), f"{name}: rows without keys must be 0"
    if not grads:
        return
    dout = torch.randn_like(out64).to(dtype)
    with poisoned_outputs():
        out.backward(dout)
    out64.backward(dout.double())
    outb.backward(dout)
    for label, a, b64, bb in zip("qkv", x, x64, xb):
        assert_fa_rule(a.grad, b64.grad, bb.grad, name=f"{name} d{label}", eps=grad_eps[dtype])


def check_non_finite_propagation(sq, poison, device="cpu", dtype=torch.float32):
    """As in PyTorch, a NaN (or an inf making scores inf - inf) yields NaN in exactly the rows that attend to
    it: never a silently dropped key or a zero row. Also used by the CUDA tests."""
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, sq, 4, 32, generator=g), torch.randn(1, 150, 2, 32, generator=g), torch.randn(
        1, 150, 2, 32, generator=g)
    if poison == "nan_query":
        q[0, sq // 2, 1, 5] = float("nan")
    else:  # key 140 of kv head 0: with causal masks only the last query rows see it
        k[0, 140, 0, 3] = float("nan") if poison == "nan_key" else float("inf")
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    out, lse = ck.flash_attn_func(q, k, v, causal=True, return_lse=True)
    out64, lse64 = ref.attention(q.double(), k.double(), v.double(), causal=True)
    assert out64.isnan().any() and not out64.isnan().all()
    assert torch.equal(out.isnan(), out64.isnan())
    assert torch.equal(lse.isfinite(), lse64.isfinite())  # NaN here where PyTorch gives +inf for inf scores
    finite = ~out64.isnan()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[finite].float(), out64[finite].float(), atol=tol, rtol=tol)
    if sq > 1:
        q.requires_grad_()
        ck.flash_attn_func(q, k, v, causal=True).sum().backward()
        assert q.grad[out64.isnan().any(-1)].isnan().all(-1).all()


def cu_seqlens(lengths, device="cpu"):
    """int32 cumulative lengths ``[0, l0, l0 + l1, ...]`` of packed documents."""
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=device)


KV_CASES = [  # batch, seqlen_q (= new tokens), cache_len, heads_q, heads_kv, head_dim, cache_seqlens
    (3, 1, 64, 4, 2, 64, [0, 17, 63]),        # ragged decode, an empty row
    (2, 1, 2100, 2, 1, 64, [2000, 1500]),     # long cache: the key range is split across cores
    (2, 4, 40, 4, 4, 32, [3, 30]),            # several new tokens (causal among them)
    (1, 20, 50, 2, 1, 128, [10]),             # prefill into a cache: tiled path
    (2, 1, 16, 8, 1, 80, 5),                  # int cache_seqlens, MQA
]


def check_kvcache_case(case, dtype, device):
    """One KV-cache call (append + attend) against the float64 reference: out and lse by the FA rule, the
    new k/v written into the caches, cache_seqlens left alone. Shared with the CUDA tests."""
    b, sn, cache_len, hq, hkv, d, lens = case
    seqlens = lens if isinstance(lens, int) else torch.tensor(lens, dtype=torch.int32, device=device)
    q, k_new, v_new = (random_tensor(b, sn, h, d, dtype=dtype).to(device) for h in (hq, hkv, hkv))
    k_cache, v_cache = (random_tensor(b, cache_len, hkv, d, dtype=dtype).to(device) for _ in range(2))
    k64, v64 = k_cache.double(), v_cache.double()
    kb, vb = k_cache.clone(), v_cache.clone()
    seqlens_before = seqlens.clone() if isinstance(seqlens, torch.Tensor) else seqlens
    with poisoned_outputs():
        out, lse = ck.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens,
                                              causal=True, return_softmax_lse=True)
    out64, lse64 = ref.attention_with_kvcache(q.double(), k64, v64, k_new.double(), v_new.double(), seqlens,
                                              causal=True)
    outb, lseb = ref.attention_with_kvcache(q, kb, vb, k_new, v_new, seqlens, causal=True)
    assert_fa_rule(out, out64, outb, name="kvcache out", eps=EPS[dtype])
    check_lse(lse, lse64, lseb, "kvcache")
    assert torch.equal(k_cache, kb) and torch.equal(v_cache, vb), "new k/v must be written into the cache"
    if isinstance(seqlens, torch.Tensor):
        assert torch.equal(seqlens, seqlens_before), "cache_seqlens must not be modified"
