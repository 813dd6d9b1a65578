"""Attention kernels' FlashAttention 2.8 features through the raw torch.ops entry points: local windows,
softcap, ALiBi, deterministic backward and any head dim, dense and varlen, against the float64 reference
(CPU; the CUDA kernels too when a GPU is present)."""
from __future__ import annotations

import math

import pytest
import torch

import cm3leon_kernels as ck
from cm3leon_kernels import reference as ref
from cm3leon_kernels._native import ops

from attention_checks import FEATURE_EPS, FEATURE_GRAD_EPS, case_id, check_against_reference, random_slopes
from helpers import FLOAT_DTYPES

DTYPES = FLOAT_DTYPES
HAS_CUDA = torch.cuda.is_available() and ck.cuda_built()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU"))]

# batch, seqlen_q, seqlen_k, heads_q, heads_kv, head_dim, causal, (window_left, window_right), softcap, alibi
# (alibi: None, "heads" = slopes (nheads,), "batch" = (batch, nheads)).
DENSE_CASES = [
    (2, 37, 53, 4, 2, 59, False, (-1, -1), 0.0, None),      # odd head dim, sq < sk, GQA
    (1, 160, 300, 2, 1, 111, True, (40, -1), 0.0, None),     # causal sliding window, several key blocks
    (1, 300, 300, 2, 2, 32, False, (20, 5), 0.0, None),      # two-sided window
    (1, 250, 90, 3, 1, 16, False, (0, 0), 0.0, None),        # diagonal only; top rows (d < 0) see no key
    (2, 120, 40, 2, 2, 24, True, (10, 3), 0.0, None),        # causal + right window (causal wins), empty rows
    (1, 200, 230, 2, 1, 64, False, (-1, 7), 0.0, None),      # right bound only
    (2, 100, 100, 4, 4, 40, False, (-1, -1), 5.0, None),     # softcap
    (2, 90, 130, 4, 2, 8, True, (-1, -1), 0.0, "heads"),     # ALiBi, shared slopes
    (2, 77, 77, 2, 1, 3, False, (9, 2), 2.0, "batch"),       # all three, per-row slopes, head dim 3
    (1, 1, 170, 4, 4, 256, True, (30, 0), 1.5, "batch"),     # decode-sized query with every feature
    (2, 3, 65, 4, 1, 1, False, (5, 5), 0.0, "heads"),        # head dim 1, short queries
]


def _dense_inputs(case, dtype, device="cpu"):
    b, sq, sk, hq, hkv, d, causal, window, softcap, alibi = case
    q = torch.randn(b, sq, hq, d).to(dtype)
    k, v = torch.randn(b, sk, hkv, d).to(dtype), torch.randn(b, sk, hkv, d).to(dtype)
    slopes = random_slopes(alibi, b, hq)
    return [t.to(device) for t in (q, k, v)], dict(causal=causal, window=window, softcap=softcap,
                                                   alibi=None if slopes is None else slopes.to(device))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("case", DENSE_CASES, ids=case_id)
def test_dense_features_match_reference(case, dtype, device):
    if dtype != torch.float32 and case[5] in (1, 3, 256):
        pytest.skip("half-precision runs cover the common head dims; odd ones run in float32")
    if device == "cuda" and case[5] % 8:
        pytest.skip("CUDA refuses head dims that are not a multiple of 8 (test_cuda_refuses_what_it_lacks)")
    (q, k, v), a = _dense_inputs(case, dtype, device)
    scale = 0.7 / math.sqrt(q.shape[-1])
    check_against_reference(
        lambda q, k, v: ops.flash_attn_forward(q, k, v, scale, a["causal"], *a["window"], a["softcap"],
                                               a["alibi"]),
        lambda q, k, v: ref.attention(q, k, v, scale, a["causal"], a["window"], a["softcap"], a["alibi"]),
        (q, k, v), dtype, case_id(case), eps=FEATURE_EPS, grad_eps=FEATURE_GRAD_EPS)


# Document lengths (queries, keys), including empty documents on either side.
VARLEN_CASES = [  # docs, heads_q, heads_kv, head_dim, causal, window, softcap, alibi
    ([(40, 40), (0, 7), (130, 150), (5, 0), (77, 60)], 4, 2, 59, True, (16, -1), 0.0, "batch"),
    ([(33, 90), (150, 150), (0, 0), (9, 9)], 2, 1, 32, False, (4, 12), 3.0, "heads"),
    ([(200, 170), (1, 50)], 3, 3, 111, False, (-1, 0), 0.0, None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("case", VARLEN_CASES, ids=case_id)
def test_varlen_features_match_reference(case, dtype, device):
    docs, hq, hkv, d, causal, window, softcap, alibi = case
    if device == "cuda" and d % 8:
        pytest.skip("CUDA refuses head dims that are not a multiple of 8 (test_cuda_refuses_what_it_lacks)")
    lq, lk = [x for x, _ in docs], [x for _, x in docs]
    cu_q = torch.tensor([0] + lq, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0] + lk, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = torch.randn(sum(lq), hq, d).to(dtype).to(device)
    k, v = torch.randn(sum(lk), hkv, d).to(dtype).to(device), torch.randn(sum(lk), hkv, d).to(dtype).to(device)
    slopes = random_slopes(alibi, len(docs), hq)
    slopes = None if slopes is None else slopes.to(device)
    cu_q, cu_k = cu_q.to(device), cu_k.to(device)
    scale = d ** -0.5
    check_against_reference(
        lambda q, k, v: ops.flash_attn_varlen_forward(q, k, v, cu_q, cu_k, max(lq), max(lk), scale, causal,
                                                      *window, softcap, slopes),
        lambda q, k, v: ref.attention_varlen(q, k, v, cu_q, cu_k, scale, causal, window, softcap, slopes),
        (q, k, v), dtype, case_id(case), eps=FEATURE_EPS, grad_eps=FEATURE_GRAD_EPS)


def test_causal_takes_the_tighter_right_bound():
    (q, k, v), _ = _dense_inputs((1, 50, 70, 2, 2, 16, True, (-1, -1), 0.0, None), torch.float32)
    out_a, lse_a = ops.flash_attn_forward(q, k, v, 0.25, True, 6, 9)
    out_b, lse_b = ops.flash_attn_forward(q, k, v, 0.25, True, 6, 0)
    out_c, lse_c = ops.flash_attn_forward(q, k, v, 0.25, False, 6, 0)
    assert torch.equal(out_a, out_b) and torch.equal(lse_a, lse_b)
    assert torch.equal(out_b, out_c) and torch.equal(lse_b, lse_c)


# ---- deterministic backward ------------------------------------------------------------------------------

def _grads(dense, deterministic, threads):
    torch.manual_seed(1)
    if dense:
        q, k, v = torch.randn(2, 333, 4, 40), torch.randn(2, 301, 2, 40), torch.randn(2, 301, 2, 40)
        out, lse = ops.flash_attn_forward(q, k, v, 0.2, True, 100, -1, 4.0, torch.rand(4))
        args = (0.2, True, 100, -1, 4.0, torch.rand(4), deterministic)
        op, extra = ops.flash_attn_backward, ()
    else:
        cu = torch.tensor([0, 140, 140, 420], dtype=torch.int32)
        q, k, v = torch.randn(420, 4, 24), torch.randn(420, 1, 24), torch.randn(420, 1, 24)
        out, lse = ops.flash_attn_varlen_forward(q, k, v, cu, cu, 280, 280, 0.3, False)
        args = (0.3, False, -1, -1, 0.0, None, deterministic)
        op, extra = ops.flash_attn_varlen_backward, (cu, cu, 280, 280)
    dout = torch.randn_like(out)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return op(dout, q, k, v, out, lse, *extra, *args)
    finally:
        torch.set_num_threads(prev)


@pytest.mark.parametrize("dense", [True, False], ids=["dense", "varlen"])
def test_deterministic_backward_is_bit_identical(dense):
    first = _grads(dense, True, 2)
    for threads in (2, 1, 2):
        again = _grads(dense, True, threads)
        for name, a, b in zip(("dq", "dk", "dv"), first, again):
            assert torch.equal(a, b), f"{name} differs between runs ({threads} threads)"
    fast = _grads(dense, False, 2)  # the default path computes the same gradients up to rounding
    for a, b in zip(first, fast):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- argument checks through the raw ops -----------------------------------------------------------------

def _raw_calls(extras):
    """Each forward/backward op called with the trailing arguments `extras` (valid tensors otherwise)."""
    q, k, v = torch.randn(2, 9, 4, 16), torch.randn(2, 11, 2, 16), torch.randn(2, 11, 2, 16)
    out, lse = ops.flash_attn_forward(q, k, v, 0.25, False)
    cu = torch.tensor([0, 9, 18], dtype=torch.int32)
    qv, kv_, vv = q.reshape(18, 4, 16), k[:, :9].reshape(18, 2, 16), v[:, :9].reshape(18, 2, 16)
    outv, lsev = ops.flash_attn_varlen_forward(qv, kv_, vv, cu, cu, 9, 9, 0.25, False)
    return {
        "forward": lambda: ops.flash_attn_forward(q, k, v, 0.25, False, *extras),
        "backward": lambda: ops.flash_attn_backward(out, q, k, v, out, lse, 0.25, False, *extras),
        "varlen_forward": lambda: ops.flash_attn_varlen_forward(qv, kv_, vv, cu, cu, 9, 9, 0.25, False, *extras),
        "varlen_backward": lambda: ops.flash_attn_varlen_backward(outv, qv, kv_, vv, outv, lsev, cu, cu, 9, 9,
                                                                  0.25, False, *extras),
    }


BAD_EXTRAS = [  # trailing arguments, expected exception, text the message must contain
    ((-2, -1), ValueError, "window_left"),
    ((-1, -7), ValueError, "window_right"),
    ((-1, -1, -0.5), ValueError, "softcap"),
    ((-1, -1, math.nan), ValueError, "softcap"),
    ((-1, -1, math.inf), ValueError, "softcap"),
    ((-1, -1, 0.0, torch.rand(4, dtype=torch.float64)), TypeError, "alibi_slopes"),
    ((-1, -1, 0.0, torch.rand(3)), ValueError, "alibi_slopes"),
    ((-1, -1, 0.0, torch.rand(3, 4)), ValueError, "alibi_slopes"),
    ((-1, -1, 0.0, torch.rand(4, 2).t()), ValueError, "alibi_slopes"),
    ((-1, -1, 0.0, torch.rand(2, 8)[:, ::2]), ValueError, "alibi_slopes"),
    ((-1, -1, 0.0, torch.rand(4, device="meta")), ValueError, "alibi_slopes"),
]


@pytest.mark.parametrize("op", ["forward", "backward", "varlen_forward", "varlen_backward"])
@pytest.mark.parametrize("bad", BAD_EXTRAS, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD_EXTRAS)])
def test_bad_extras_raise_naming_the_argument(op, bad):
    extras, error, text = bad
    with pytest.raises(error, match=text):
        _raw_calls(extras)[op]()


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_cuda_refuses_what_it_lacks():
    q = torch.randn(1, 8, 2, 12, device="cuda")
    with pytest.raises(NotImplementedError, match="head dim"):
        ops.flash_attn_forward(q, q, q, 0.3, False)
    q = torch.randn(1, 8, 2, 16, device="cuda")
    out, lse = ops.flash_attn_forward(q, q, q, 0.3, False)
    with pytest.raises(NotImplementedError, match="deterministic"):
        ops.flash_attn_backward(out, q, q, q, out, lse, 0.3, False, -1, -1, 0.0, None, True)


@pytest.mark.parametrize("d", [0, 257])
def test_head_dim_out_of_range_raises(d):
    q, k = torch.randn(1, 4, 2, d), torch.randn(1, 4, 2, d)
    with pytest.raises(ValueError, match="head dim"):
        ops.flash_attn_forward(q, k, k, 0.5, False)


def test_opcheck_with_extras():
    """Schemas, fake kernels and autograd registration agree with the kernels when every extra is given."""
    q, k, v = (torch.randn(2, 9, 4, 24, requires_grad=True) for _ in range(3))
    extras = (3, 1, 2.5, torch.rand(2, 4), True)
    torch.library.opcheck(ops.flash_attn_forward, (q, k, v, 0.3, False, *extras))
    out, lse = ops.flash_attn_forward(q, k, v, 0.3, False, *extras)
    torch.library.opcheck(ops.flash_attn_backward, (torch.randn_like(out), q.detach(), k.detach(), v.detach(),
                                                    out.detach(), lse, 0.3, False, *extras))
    cu = torch.tensor([0, 3, 3, 9], dtype=torch.int32)
    q3, k3, v3 = (torch.randn(9, 4, 24, requires_grad=True) for _ in range(3))
    extras3 = (-1, 2, 0.0, torch.rand(4), False)
    torch.library.opcheck(ops.flash_attn_varlen_forward, (q3, k3, v3, cu, cu, 6, 6, 0.3, True, *extras3))
    o3, l3 = ops.flash_attn_varlen_forward(q3, k3, v3, cu, cu, 6, 6, 0.3, True, *extras3)
    torch.library.opcheck(ops.flash_attn_varlen_backward,
                          (torch.randn_like(o3), q3.detach(), k3.detach(), v3.detach(), o3.detach(), l3, cu, cu,
                           6, 6, 0.3, True, *extras3))
