"""Fused attention: forward, backward, packed documents and KV-cache decode against float64 references."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cm3leon_kernels as ck
from cm3leon_kernels import reference as ref

from attention_checks import (KV_CASES, check_against_reference, check_kvcache_case, check_non_finite_propagation,
                              cu_seqlens, leaves, random_tensor)
from helpers import FLOAT_DTYPES, assert_fa_rule, poisoned_outputs

DTYPES = FLOAT_DTYPES


# ---- flash_attn_func ---------------------------------------------------------------------------------------

DENSE_CASES = [  # batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal
    (2, 37, 37, 4, 4, 64, True),
    (2, 37, 37, 4, 4, 64, False),
    (1, 130, 130, 2, 2, 32, True),    # several query and key blocks
    (1, 311, 301, 4, 2, 40, True),    # several backward key blocks (144 keys) across the diagonal, GQA
    (2, 5, 70, 4, 2, 64, True),       # seqlen_q < seqlen_k: bottom-right aligned
    (1, 70, 21, 3, 1, 96, True),      # seqlen_q > seqlen_k: top rows see no key (MQA)
    (1, 53, 99, 8, 2, 80, False),     # GQA 4:1, odd lengths
    (2, 1, 1, 2, 1, 128, True),       # single token
    (1, 3, 300, 4, 1, 64, True),      # short queries take the decode path (GQA group shares K/V)
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_flash_attn_func_matches_reference(case, dtype):
    b, sq, sk, hq, hkv, d, causal = case
    q = random_tensor(b, sq, hq, d, dtype=dtype)
    k, v = random_tensor(b, sk, hkv, d, dtype=dtype), random_tensor(b, sk, hkv, d, dtype=dtype)
    check_against_reference(lambda q, k, v: ck.flash_attn_func(q, k, v, causal=causal, return_lse=True),
                             lambda q, k, v: ref.attention(q, k, v, causal=causal), (q, k, v), dtype,
                             str(case))


@pytest.mark.parametrize("head_dim", [8, 32, 64, 80, 96, 128, 256])
def test_head_dims_and_softmax_scale(head_dim):
    q = torch.randn(1, 29, 2, head_dim)
    k, v = torch.randn(1, 41, 1, head_dim), torch.randn(1, 41, 1, head_dim)
    check_against_reference(
        lambda q, k, v: ck.flash_attn_func(q, k, v, softmax_scale=0.3, causal=True, return_lse=True),
        lambda q, k, v: ref.attention(q, k, v, softmax_scale=0.3, causal=True), (q, k, v), torch.float32,
        f"d={head_dim}")


def test_rows_without_keys_give_zero_and_zero_grad():
    q, k, v = leaves(torch.randn(1, 9, 2, 32), torch.randn(1, 4, 2, 32), torch.randn(1, 4, 2, 32))
    out, lse = ck.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert (out[:, :5] == 0).all() and (lse[:, :, :5] == float("-inf")).all()
    out.sum().backward()
    assert (q.grad[:, :5] == 0).all() and torch.isfinite(k.grad).all()


@pytest.mark.parametrize("sq", [37, 1], ids=["tiled", "decode"])
@pytest.mark.parametrize("poison", ["nan_key", "inf_key", "nan_query"])
def test_non_finite_inputs_poison_the_rows_that_see_them(sq, poison):
    check_non_finite_propagation(sq, poison)


def test_large_scores_are_stable():
    """Scores near 1000: the online softmax must rescale without overflow. (Forward only: recomputing P
    from a saved lse of magnitude ~1000 has an inherent relative error of |lse| * 2^-24, as in
    FlashAttention.)"""
    q = torch.randn(1, 64, 2, 64) * 30
    k, v = torch.randn(1, 64, 2, 64) * 30, torch.randn(1, 64, 2, 64)
    check_against_reference(lambda q, k, v: ck.flash_attn_func(q, k, v, causal=True, return_lse=True),
                             lambda q, k, v: ref.attention(q, k, v, causal=True), (q, k, v), torch.float32,
                             "large scores", grads=False)


def test_non_contiguous_inputs_are_accepted():
    qkv = torch.randn(2, 17, 3, 4, 32)  # a fused qkv projection: q, k, v are strided views
    q, k, v = qkv.unbind(2)
    out = ck.flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(out, ref.attention(q, k, v, causal=True)[0], atol=1e-5, rtol=1e-5)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 2), sq=st.integers(0, 70), sk=st.integers(0, 70), group=st.sampled_from([1, 2, 3]),
       hkv=st.integers(1, 2), d=st.sampled_from([16, 40, 64]), causal=st.booleans())
def test_random_shapes_forward(b, sq, sk, group, hkv, d, causal):
    q, k, v = torch.randn(b, sq, group * hkv, d), torch.randn(b, sk, hkv, d), torch.randn(b, sk, hkv, d)
    with poisoned_outputs():
        out, lse = ck.flash_attn_func(q, k, v, causal=causal, return_lse=True)
    out64, lse64 = ref.attention(q.double(), k.double(), v.double(), causal=causal)
    assert_fa_rule(out, out64, ref.attention(q, k, v, causal=causal)[0], name="out", eps=1e-6)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(lse64))


# ---- flash_attn_varlen_func --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_matches_reference(dtype, causal):
    lq, lk = [13, 0, 60, 1, 7, 0], [13, 5, 75, 1, 0, 0]  # empty documents on either side
    hq, hkv, d = 4, 2, 64
    q, k, v = random_tensor(sum(lq), hq, d, dtype=dtype), random_tensor(sum(lk), hkv, d, dtype=dtype), random_tensor(sum(lk), hkv, d,
                                                                                              dtype=dtype)
    cq, ckk = cu_seqlens(lq), cu_seqlens(lk)
    check_against_reference(
        lambda q, k, v: ck.flash_attn_varlen_func(q, k, v, cq, ckk, max(lq), max(lk), causal=causal,
                                                  return_lse=True),
        lambda q, k, v: ref.attention_varlen(q, k, v, cq, ckk, causal=causal), (q, k, v), dtype, "varlen")


def test_varlen_equals_separate_calls():
    lengths = [5, 33, 1, 20]
    q, k, v = torch.randn(59, 2, 32), torch.randn(59, 2, 32), torch.randn(59, 2, 32)
    packed = ck.flash_attn_varlen_func(q, k, v, cu_seqlens(lengths), cu_seqlens(lengths), 33, 33, causal=True)
    start = 0
    for n in lengths:
        s = slice(start, start + n)
        one = ck.flash_attn_func(q[None, s], k[None, s], v[None, s], causal=True)[0]
        torch.testing.assert_close(packed[s], one, atol=1e-6, rtol=1e-5)
        start += n


# ---- flash_attn_with_kvcache -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("case", KV_CASES, ids=lambda c: "-".join(map(str, c[:6])))
def test_kvcache_matches_reference(case, dtype):
    check_kvcache_case(case, dtype, "cpu")


def test_kvcache_without_new_tokens_and_full_cache():
    q, kc, vc = torch.randn(2, 1, 2, 32), torch.randn(2, 9, 2, 32), torch.randn(2, 9, 2, 32)
    full = ck.flash_attn_with_kvcache(q, kc, vc, causal=True)
    torch.testing.assert_close(full, ck.flash_attn_func(q, kc, vc, causal=True), atol=1e-6, rtol=1e-5)
    part = ck.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([4, 9], dtype=torch.int32))
    torch.testing.assert_close(part[0], ck.flash_attn_func(q[:1], kc[:1, :4], vc[:1, :4])[0], atol=1e-6,
                               rtol=1e-5)


def test_kvcache_reference_defaults_match_the_kernel():
    # The plain-PyTorch twin must not be causal by default where flash_attn_with_kvcache is not (FA 2.8).
    q, kn, vn = torch.randn(2, 3, 4, 8), torch.randn(2, 2, 2, 8), torch.randn(2, 2, 2, 8)
    kc, vc = torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    lens = _i32([2, 5])
    out = ck.flash_attn_with_kvcache(q, kc.clone(), vc.clone(), kn, vn, cache_seqlens=lens)
    want, _ = ref.attention_with_kvcache(q.double(), kc.double(), vc.double(), kn.double(), vn.double(),
                                         cache_seqlens=lens)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_decode_loop_matches_full_attention():
    """Token-by-token decode through the cache reproduces causal attention over the whole sequence."""
    s, h, d = 12, 2, 32
    q, k, v = torch.randn(1, s, h, d), torch.randn(1, s, h, d), torch.randn(1, s, h, d)
    kc, vc = torch.zeros(1, 16, h, d), torch.zeros(1, 16, h, d)
    steps = [ck.flash_attn_with_kvcache(q[:, t:t + 1], kc, vc, k[:, t:t + 1], v[:, t:t + 1], cache_seqlens=t)
             for t in range(s)]
    torch.testing.assert_close(torch.cat(steps, 1), ck.flash_attn_func(q, k, v, causal=True), atol=1e-6,
                               rtol=1e-5)


# ---- bad input ---------------------------------------------------------------------------------------------

def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


def _qkv(b=1, s=8, hq=4, hkv=2, d=32, dtype=torch.float32):
    return torch.randn(b, s, hq, d, dtype=dtype), torch.randn(b, s, hkv, d, dtype=dtype), \
        torch.randn(b, s, hkv, d, dtype=dtype)


def _bad_calls():
    q, k, v = _qkv()
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q3, k3, v3 = q[0], k[0], v[0]
    kc, vc = torch.zeros(2, 10, 2, 32), torch.zeros(2, 10, 2, 32)
    qd, kn = torch.randn(2, 1, 4, 32), torch.randn(2, 1, 2, 32)
    return {
        "head count": (lambda: ck.flash_attn_func(q, torch.randn(1, 8, 3, 32), torch.randn(1, 8, 3, 32)),
                       ValueError, "head count"),
        "dtype mismatch": (lambda: ck.flash_attn_func(q, k.half(), v.half()), TypeError, "share a dtype"),
        "int dtype": (lambda: ck.flash_attn_func(q.int(), k.int(), v.int()), TypeError, "q must be"),
        "dropout": (lambda: ck.flash_attn_func(q, k, v, dropout_p=1.0), ValueError, "dropout_p"),
        "head dim": (lambda: ck.flash_attn_func(*_qkv(d=264)), ValueError, "head dim"),
        "k/v shape": (lambda: ck.flash_attn_func(q, k, v[:, :4]), ValueError, "k and v"),
        "batch": (lambda: ck.flash_attn_func(q, torch.cat([k, k]), torch.cat([v, v])), ValueError, "batch"),
        "rank": (lambda: ck.flash_attn_func(q3, k3, v3), ValueError, "q must be 4-D"),
        "last dim stride": (lambda: ck.flash_attn_func(q.transpose(2, 3), k, v), ValueError,
                            "last dimension"),
        "device": (lambda: ck.flash_attn_func(q, k.to("meta"), v.to("meta")), ValueError, "k is on meta"),
        "cu dtype": (lambda: ck.flash_attn_varlen_func(q3, k3, v3, cu.long(), cu, 5, 5), TypeError,
                     "cu_seqlens_q must be int32"),
        "cu end": (lambda: ck.flash_attn_varlen_func(q3, k3, v3, cu, _i32([0, 3, 7]), 5, 5), ValueError,
                   "cu_seqlens_k[-1]"),
        "cu decreasing": (lambda: ck.flash_attn_varlen_func(q3, k3, v3, _i32([0, 5, 3, 8]),
                                                            _i32([0, 3, 5, 8]), 8, 8),
                          ValueError, "non-decreasing"),
        "cu start": (lambda: ck.flash_attn_varlen_func(q3, k3, v3, _i32([1, 8]), _i32([0, 8]), 8, 8),
                     ValueError, "cu_seqlens_q[0]"),
        "max_seqlen": (lambda: ck.flash_attn_varlen_func(q3, k3, v3, cu, cu, 4, 5), ValueError, "max_seqlen"),
        "max_seqlen float": (lambda: ck.flash_attn_varlen_func(q3, k3, v3, cu, cu, 5, 4.9), TypeError,
                             "max_seqlen_k must be an int"),
        "cu count": (lambda: ck.flash_attn_varlen_func(q3, k3, v3, cu, _i32([0, 8]), 8, 8), ValueError,
                     "same length"),
        "cache overflow": (lambda: ck.flash_attn_with_kvcache(qd, kc, vc, kn, kn.clone(),
                                                              cache_seqlens=_i32([3, 10])),
                           ValueError, "cache_seqlens[1] = 10"),
        "negative seqlen": (lambda: ck.flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=-1), ValueError,
                            "cache_seqlens"),
        "seqlens dtype": (lambda: ck.flash_attn_with_kvcache(qd, kc, vc, kn, kn.clone(),
                                                             cache_seqlens=torch.tensor([3, 4])), TypeError, "int32"),
        "k without v": (lambda: ck.flash_attn_with_kvcache(qd, kc, vc, kn, None, cache_seqlens=3), ValueError, "together"),
        "cache strided": (lambda: ck.flash_attn_with_kvcache(qd, kc[:, ::2], vc[:, ::2], cache_seqlens=2),
                          ValueError, "contiguous"),
        "cache dtype": (lambda: ck.flash_attn_with_kvcache(qd, kc.half(), vc.half(), cache_seqlens=2),
                        TypeError, "share a dtype"),
        "scale nan": (lambda: ck.flash_attn_func(q, k, v, softmax_scale=float("nan")), ValueError,
                      "softmax_scale must be a finite number"),
        "varlen scale inf": (lambda: ck.flash_attn_varlen_func(q3, k3, v3, cu, cu, 5, 5, softmax_scale=math.inf),
                             ValueError, "softmax_scale"),
        "decode scale nan": (lambda: ck.flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=2,
                                                                softmax_scale=float("nan")),
                             ValueError, "softmax_scale"),
        "q not a tensor": (lambda: ck.flash_attn_with_kvcache(None, kc, vc, cache_seqlens=2), TypeError,
                           "q must be a torch.Tensor"),
        "k_cache not a tensor": (lambda: ck.flash_attn_with_kvcache(qd, kc.tolist(), vc, cache_seqlens=2),
                                 TypeError, "k_cache must be a torch.Tensor"),
        "seqlens bool": (lambda: ck.flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=True), TypeError,
                         "cache_seqlens must be an int"),
    }


@pytest.mark.parametrize("name", list(_bad_calls()))
def test_bad_input_raises_clear_error(name):
    call, exc, message = _bad_calls()[name]
    with pytest.raises(exc, match=re.escape(message)):
        call()


def test_bad_input_reaches_cpp_checks():
    """The C++ launchers re-check what the Python wrappers check (calls straight into torch.ops)."""
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="multiple"):
        torch.ops.cm3leon.flash_attn_forward(q, torch.randn(1, 8, 3, 32), torch.randn(1, 8, 3, 32), 1.0,
                                             False)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.cm3leon.flash_attn_forward(q, k.double(), v.double(), 1.0, False)


def test_integer_like_cache_seqlens():
    """A numpy integer is an int for cache_seqlens (bools are not)."""
    qd, kc, vc = torch.randn(2, 1, 4, 32), torch.randn(2, 10, 2, 32), torch.randn(2, 10, 2, 32)
    torch.testing.assert_close(ck.flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=np.int64(3)),
                               ck.flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=3), rtol=0, atol=0)


def test_no_silent_missing_gradients():
    """The KV-cache op and double backward raise instead of PyTorch's warning plus missing gradients."""
    q = torch.randn(1, 1, 2, 32, requires_grad=True)
    out = ck.flash_attn_with_kvcache(q, torch.randn(1, 8, 2, 32), torch.randn(1, 8, 2, 32), cache_seqlens=5)
    with pytest.raises(RuntimeError, match="flash_attn_kvcache is not implemented"):
        out.sum().backward()
    for varlen in (False, True):
        q = torch.randn(1, 5, 2, 8, requires_grad=True)
        if varlen:
            cu = _i32([0, 2, 5])
            out = ck.flash_attn_varlen_func(q[0], q[0], q[0], cu, cu, 3, 3, causal=True)
        else:
            out = ck.flash_attn_func(q, q, q, causal=True)
        (grad,) = torch.autograd.grad((out ** 2).sum(), q, create_graph=True)
        with pytest.raises(RuntimeError, match="flash_attn_(varlen_)?backward is not implemented"):
            grad.sum().backward()


# ---- torch.library integration -----------------------------------------------------------------------------

def test_opcheck_all_ops():
    q, k, v = _qkv(b=2, s=9)
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    ops = torch.ops.cm3leon
    torch.library.opcheck(ops.flash_attn_forward, (q, k, v, 0.3, True))
    out, lse = ops.flash_attn_forward(q, k, v, 0.3, True)
    torch.library.opcheck(ops.flash_attn_backward, (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                                                    out.detach(), lse, 0.3, True))
    cu = torch.tensor([0, 3, 3, 9], dtype=torch.int32)
    q3, k3, v3 = [t.detach()[0].repeat(1, 1, 1).requires_grad_() for t in (q, k, v)]
    torch.library.opcheck(ops.flash_attn_varlen_forward, (q3, k3, v3, cu, cu, 6, 6, 0.3, True))
    o3, l3 = ops.flash_attn_varlen_forward(q3, k3, v3, cu, cu, 6, 6, 0.3, True)
    torch.library.opcheck(ops.flash_attn_varlen_backward,
                          (torch.randn_like(o3), q3.detach(), k3.detach(), v3.detach(), o3.detach(), l3, cu,
                           cu, 6, 6, 0.3, True))
    kc, vc = torch.randn(2, 12, 2, 32), torch.randn(2, 12, 2, 32)
    torch.library.opcheck(ops.flash_attn_kvcache, (torch.randn(2, 1, 4, 32), kc, vc, torch.randn(2, 1, 2, 32),
                                                   torch.randn(2, 1, 2, 32), _i32([3, 11]), 0, 0.2, True))


def test_torch_compile_fullgraph_forward_backward_and_decode():
    q, k, v = leaves(*_qkv(s=16))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def train_step(q, k, v):
        return (ck.flash_attn_func(q, k, v, causal=True) ** 2).sum()

    train_step(q, k, v).backward()
    q2, k2, v2 = leaves(q, k, v)
    (ck.flash_attn_func(q2, k2, v2, causal=True) ** 2).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def decode(q, kc, vc, kn, vn, lens):
        return ck.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens)

    kc, vc = torch.zeros(2, 8, 2, 32), torch.zeros(2, 8, 2, 32)
    qd, kn, vn = torch.randn(2, 1, 4, 32), torch.randn(2, 1, 2, 32), torch.randn(2, 1, 2, 32)
    lens = torch.tensor([0, 5], dtype=torch.int32)
    out = decode(qd, kc, vc, kn, vn, lens)
    assert torch.equal(kc[1, 5], kn[1, 0]), "compiled call must update the cache in place"
    torch.testing.assert_close(out, ck.flash_attn_with_kvcache(qd, kc.clone(), vc.clone(), kn, vn,
                                                               cache_seqlens=lens))


def test_torch_compile_fullgraph_symbolic_floats():
    # dynamic=True makes the float defaults (dropout_p, softcap) symbolic, and so does a float argument whose
    # value changes between calls: the argument checks must trace them without a graph break.
    q, k, v = _qkv(b=2, s=16)

    @torch.compile(fullgraph=True, dynamic=True, backend="aot_eager")
    def dense(q, k, v, scale, cap):
        return ck.flash_attn_func(q, k, v, softmax_scale=scale, causal=True, softcap=cap)

    kc, vc = torch.randn(2, 8, 2, 32), torch.randn(2, 8, 2, 32)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def decode(q, scale, cap):
        return ck.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=5, softmax_scale=scale, softcap=cap)

    for scale, cap in ((0.1, 2.0), (0.2, 3.0), (0.3, 4.0)):
        torch.testing.assert_close(dense(q, k, v, scale, cap),
                                   ck.flash_attn_func(q, k, v, softmax_scale=scale, causal=True, softcap=cap))
        torch.testing.assert_close(decode(q[:, :1], scale, cap), ck.flash_attn_with_kvcache(
            q[:, :1], kc, vc, cache_seqlens=5, softmax_scale=scale, softcap=cap))


def test_torch_func_vmap_loops_and_grad_transforms_raise():
    # docs/kernels.md: vmap uses PyTorch's per-sample fallback; torch.func's autograd transforms are unsupported.
    q, k, v = torch.randn(3, 1, 5, 4, 32), torch.randn(3, 1, 7, 2, 32), torch.randn(3, 1, 7, 2, 32)
    mapped = torch.func.vmap(lambda q, k, v: ck.flash_attn_func(q, k, v, causal=True))(q, k, v)
    torch.testing.assert_close(mapped, torch.stack([ck.flash_attn_func(*t, causal=True) for t in zip(q, k, v)]))
    with pytest.raises(RuntimeError, match="functorch transforms"):
        torch.func.grad(lambda q: ck.flash_attn_func(q, k[0], v[0]).sum())(q[0])
